"""Secrets for Ray jobs, sealed with the cluster's auth token.

Ray writes a job's runtime_env, env_vars included, into every node's runtime_env_agent.log (INFO,
"Creating runtime env: ..."), so a secret must not travel there in clear. `dtrain submit` seals the
SECRET_VARS set in the submitter's shell into one Fernet token (AES-CBC + HMAC-SHA256) under a key
derived from the cluster's auth token, and sends that as DTRAIN_SEALED_SECRETS; the job's driver and
its training workers unseal it into their environment. Reading the logs without the token reveals
nothing; holding the token already means being able to run code on the cluster.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from dtrain.errors import DtrainError

SECRET_VARS = ("WANDB_API_KEY", "DTRAIN_SERVE_TOKENS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
SEALED_VAR = "DTRAIN_SEALED_SECRETS"


class SecretsError(DtrainError, RuntimeError):
    """Sealed secrets that this node cannot open."""


def cluster_token() -> str | None:
    """The Ray auth token, where Ray looks for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = path.read_text().strip() if path.is_file() else ""
    return token or None


def _fernet(token: str):
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dtrain sealed secrets v1").derive(token.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def seal(values: dict[str, str], token: str) -> str:
    return _fernet(token).encrypt(json.dumps(values).encode()).decode()


def unseal(sealed: str, token: str) -> dict[str, str]:
    from cryptography.fernet import InvalidToken

    try:
        return json.loads(_fernet(token).decrypt(sealed.encode()))
    except InvalidToken:
        raise SecretsError(f"{SEALED_VAR} does not open with this node's Ray auth token: "
                           "the job was sealed for another cluster") from None


def unseal_into_environ() -> list[str]:
    """Put the job's sealed secrets into os.environ (values already set here win); their names."""
    sealed = os.environ.get(SEALED_VAR)
    if not sealed:
        return []
    token = cluster_token()
    if not token:
        raise SecretsError(f"{SEALED_VAR} is set but this node has no Ray auth token to open it")
    values = unseal(sealed, token)
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return sorted(values)
