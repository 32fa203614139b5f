"""Who a JSON API request is (a bearer token) and what its role lets it do."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stepfleet.api.auth import Principal, Role
from stepfleet.api.errors import ApiError
from stepfleet.api.fleet import Fleet

bearer = HTTPBearer(auto_error=False, description="A token from `stepfleet token add`.")


def get_fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None:
        raise ApiError(401, "no token: send Authorization: Bearer <token>")
    principal = await get_fleet(request).principal(credentials.credentials)
    if principal is None:
        raise ApiError(401, "unknown or revoked token")
    request.state.principal = principal
    return principal


def _needs(role: Role, *, fleet_wide: bool = False) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(caller)]) -> Principal:
        if not principal.may(role):
            raise ApiError(
                403,
                f"needs the {role.value} role; token {principal.name!r} is {principal.role.value}",
            )
        if fleet_wide and principal.tenant is not None:
            raise ApiError(
                403, f"needs a token of no tenant; token {principal.name!r} is {principal.tenant}'s"
            )
        return principal

    return check


Viewer = Annotated[Principal, Depends(_needs(Role.VIEWER))]
Operator = Annotated[Principal, Depends(_needs(Role.OPERATOR))]
FleetViewer = Annotated[Principal, Depends(_needs(Role.VIEWER, fleet_wide=True))]
FleetAdmin = Annotated[Principal, Depends(_needs(Role.ADMIN, fleet_wide=True))]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
