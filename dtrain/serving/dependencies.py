"""FastAPI dependencies of the serving app's routes: the ingress replica that answers (it holds the
sampler handle, the state store (jobs, quotas, response cache) and the admission gate) and the caller's
tenant, authorized once per request by the bearer-token security scheme (401 for a missing or unknown
token when the deployment has tokens)."""
# No `from __future__ import annotations` here: FastAPI reads these signatures.
from typing import Annotated, Optional

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from dtrain.serving.ingress import IngressReplica

bearer = HTTPBearer(auto_error=False, description="Required when the deployment has tokens")


async def current_ingress() -> IngressReplica:
    """The ingress replica this request reached (an IngressReplica: the deployment dtrain.serving.app.Ingress)."""
    return serve.get_replica_context().servable_object


IngressDep = Annotated[IngressReplica, Depends(current_ingress)]


async def tenant(ingress: IngressDep, creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> str:
    """The caller's tenant (who owns its jobs, whose quota and tier apply); 401 for a missing or unknown token."""
    return ingress.authorize(creds)


# The caller's tenant as a route parameter; computed once per request however many times it is declared.
Tenant = Annotated[str, Security(tenant)]
