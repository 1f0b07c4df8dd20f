"""Optional bearer-token auth for the ingress. Tokens come from a file (one per line, `TOKEN` or
`TOKEN TENANT`, # comments) and/or an environment variable (comma-separated, `TOKEN` or
`TOKEN=TENANT`), read inside the replica so they never travel in the deployment's arguments. Only
SHA-256 digests are kept; they are compared in constant time. A token's tenant names it for quotas,
tiers and job ownership; an unnamed token is its own tenant."""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Optional


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class BearerAuth:
    def __init__(self, tokens_file: Optional[str], tokens_env: str):
        entries = [t.strip().partition("=")[::2] for t in os.environ.get(tokens_env, "").split(",")]
        if tokens_file:
            lines = Path(tokens_file).read_text().splitlines()
            entries += [(f + [""])[:2] for f in (line.split(None, 1) for line in lines)
                        if f and not f[0].startswith("#")]
        self._tenants = {_digest(token): name.strip() or _digest(token).hex()[:16] for token, name in entries if token}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def allows(self, token: Optional[str]) -> bool:
        """True when auth is off, or `token` (of an `Authorization: Bearer <token>` header) is known."""
        return not self._tenants or self.tenant(token) is not None

    def tenant(self, token: Optional[str]) -> Optional[str]:
        """The token's tenant ("anonymous" when auth is off), None for an unknown token."""
        if not self._tenants:
            return "anonymous"
        if not token:
            return None
        given = _digest(token)
        found = None
        for digest, name in self._tenants.items():  # every digest compared: the time says nothing of which matched
            if hmac.compare_digest(given, digest):
                found = name
        return found
