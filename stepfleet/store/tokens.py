"""API tokens: a name, a role, an optional tenant, and the SHA-256 of the secret.

The secret is made and shown by the caller once; only its hash is stored, so a copy of the
database lets nobody in. Secrets are 256 random bits, so a plain SHA-256 is enough (no salt or
slow hash is needed against guessing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from stepfleet.store.errors import translated
from stepfleet.store.tables import api_tokens


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as stored (never its secret)."""

    name: str
    role: str
    tenant: str | None
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class TokenStore:
    """Token rows; shares the PgStore's connection pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, name: str, role: str, tenant: str | None, secret_sha256: str) -> bool:
        """Store a new token; return False when the name is taken (also by a revoked one)."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                insert(api_tokens)
                .values(name=name, role=role, tenant=tenant, secret_sha256=secret_sha256)
                .on_conflict_do_nothing()
                .returning(api_tokens.c.name)
            )
            return result.first() is not None

    async def by_secret(self, secret_sha256: str) -> TokenRecord | None:
        """The live (not revoked) token with this secret hash; its last use is recorded at
        most once a minute, so reads stay reads."""
        c = api_tokens.c
        async with translated(), self._engine.begin() as connection:
            row = (
                await connection.execute(
                    select(api_tokens).where(
                        c.secret_sha256 == secret_sha256, c.revoked_at.is_(None)
                    )
                )
            ).first()
            if row is None:
                return None
            await connection.execute(
                update(api_tokens)
                .where(
                    c.name == row.name,
                    c.last_used_at.is_(None)
                    | (c.last_used_at < func.now() - text("interval '60 seconds'")),
                )
                .values(last_used_at=func.now())
            )
            return _token(row)

    async def all(self) -> list[TokenRecord]:
        """Every token, revoked ones too, by name."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(select(api_tokens).order_by(api_tokens.c.name))
            return [_token(row) for row in result]

    async def revoke(self, name: str) -> bool:
        """Revoke a live token; return False when there is none of that name."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                update(api_tokens)
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=func.now())
            )
            return bool(result.rowcount)


def _token(row: Any) -> TokenRecord:
    return TokenRecord(
        name=row.name,
        role=row.role,
        tenant=row.tenant,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )
