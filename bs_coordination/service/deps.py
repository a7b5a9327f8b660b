"""Dependencies of the routes, as ``Annotated`` aliases (one place to change how they are got).

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a thread pool,
which cost more than the whole lock operation on the memory store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from bs_coordination.stores import Store

from .auth import (
    LOCK_HOLDER_ROLES,
    PRINCIPAL_SCOPE_KEY,
    SCHEME_NAME,
    KeyRing,
    Principal,
    Role,
    identify,
    require,
)
from .config import Settings
from .discovery import DeviceRegistry
from .hub import EventHub


async def get_store(conn: HTTPConnection) -> Store:
    store: Store = conn.app.state.store
    return store


async def get_hub(conn: HTTPConnection) -> EventHub:
    hub: EventHub = conn.app.state.hub
    return hub


async def get_settings(conn: HTTPConnection) -> Settings:
    settings: Settings = conn.app.state.settings
    return settings


StoreDep = Annotated[Store, Depends(get_store)]
HubDep = Annotated[EventHub, Depends(get_hub)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


#: Declares the ``Authorization: ApiKey <key>`` scheme in OpenAPI (``auth.describe_security``
#: removes it again when authentication is off).
api_key_header = APIKeyHeader(name="Authorization", scheme_name=SCHEME_NAME, auto_error=False)


def principal_of(conn: HTTPConnection, authorization: str | None = None) -> Principal | None:
    """The key's principal, or ``None`` when authentication is off (401 for a missing or
    unknown key: the middleware normally refused it already and left the principal in the
    scope)."""
    keyring: KeyRing | None = getattr(conn.app.state, "keyring", None)
    if keyring is None:
        return None
    principal: Principal | None = conn.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        return principal
    return identify(keyring, authorization if authorization is not None
                    else conn.headers.get("authorization"))


async def get_principal(
    conn: HTTPConnection, authorization: Annotated[str | None, Security(api_key_header)] = None
) -> Principal | None:
    return principal_of(conn, authorization)


async def get_lock_holder(principal: Annotated[Principal | None, Depends(get_principal)]) -> Principal | None:
    """A principal that may hold locks (and so release and renew its own): 403 for ``read``."""
    require(principal, *LOCK_HOLDER_ROLES, what="releasing or renewing a lock")
    return principal


async def get_admin(principal: Annotated[Principal | None, Depends(get_principal)]) -> Principal | None:
    require(principal, Role.ADMIN, what="this operation")
    return principal


#: Any valid key (every role can read); ``None`` with authentication off.
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
#: A key with a role that holds locks (operator, queue, admin).
LockHolderDep = Annotated[Principal | None, Depends(get_lock_holder)]
#: A key with the admin role.
AdminDep = Annotated[Principal | None, Depends(get_admin)]


@dataclass(frozen=True, slots=True)
class Caller:
    """What a lock route needs: the store, the device registry and the caller's principal."""

    store: Store
    devices: DeviceRegistry
    principal: Principal | None


def caller(conn: HTTPConnection) -> Caller:
    """The lock routes' caller, read from the connection by the route itself (not through
    ``Depends``): the lock routes are the hot path, and FastAPI's dependency resolution costs
    more per request than the whole lock operation on the memory store (measured:
    ``benchmarks/bench_etcd.py``). Authentication needs no dependency to be declared in
    OpenAPI: ``auth.describe_security`` declares the key on every route."""
    state = conn.app.state
    return Caller(state.store, state.devices, principal_of(conn))
