"""Optional bearer-token auth for the ingress. Tokens come from a file (one per line, # comments)
and/or an environment variable (comma-separated), read inside the replica so they never travel in
the deployment's arguments. Only SHA-256 digests are kept; they are compared in constant time."""
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
        tokens = [t.strip() for t in os.environ.get(tokens_env, "").split(",")]
        if tokens_file:
            lines = Path(tokens_file).read_text().splitlines()
            tokens += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        self._digests = [_digest(t) for t in tokens if t]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant(self, token: Optional[str]) -> str:
        """Who a caller is, for owning jobs: a digest of its token (never the token), "anonymous" without auth."""
        return _digest(token).hex()[:16] if self._digests and token else "anonymous"

    def allows(self, token: Optional[str]) -> bool:
        """True when auth is off, or `token` (of an `Authorization: Bearer <token>` header) is known."""
        if not self._digests:
            return True
        if not token:
            return False
        given = _digest(token)
        # every digest compared, so the time taken says nothing about which token came close
        return sum(hmac.compare_digest(given, d) for d in self._digests) > 0
