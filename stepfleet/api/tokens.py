"""Issuing and revoking tokens, for `stepfleet token` and the API alike; both audited."""

from __future__ import annotations

import re

from stepfleet.api.auth import Role, new_secret, secret_hash
from stepfleet.schemas import is_tenant
from stepfleet.store import AuditEntry, PgStore, TokenRecord

TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


class TokenError(Exception):
    """A token that cannot be issued or revoked, with a message for the operator."""


async def issue_token(
    store: PgStore, name: str, role: str, tenant: str | None, *, actor: str
) -> tuple[TokenRecord, str]:
    """Make a token; return it and its secret (shown once, stored as its SHA-256)."""
    if not TOKEN_NAME.fullmatch(name):
        raise TokenError(
            f"{name!r} is not a token name (letters, digits, . _ @ -; at most 100 characters)"
        )
    if role not in {r.value for r in Role}:
        raise TokenError(f"{role!r} is not a role: viewer, operator or admin")
    if tenant is not None and not is_tenant(tenant):
        raise TokenError(f"{tenant!r} is not a tenant name")
    secret = new_secret()
    if not await store.tokens.add(name, role, tenant, secret_hash(secret)):
        raise TokenError(f"a token named {name!r} exists (revoked names are not reused)")
    async with store.control() as tx:
        await tx.audit(
            AuditEntry(actor, "token-add", name, detail=f"role {role}, tenant {tenant or '*'}")
        )
    return TokenRecord(name, role, tenant), secret


async def revoke_token(store: PgStore, name: str, *, actor: str) -> None:
    """Revoke a live token at once: its next request is refused."""
    if not await store.tokens.revoke(name):
        raise TokenError(f"no live token named {name!r}")
    async with store.control() as tx:
        await tx.audit(AuditEntry(actor, "token-revoke", name))
