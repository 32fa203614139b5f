"""What each account's archived letters hold, kept in `dead_letter_usage` so the archive can
bound it per tenant."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from stepfleet.store.dead_letter_records import NewDeadLetter
from stepfleet.store.tables import dead_letter_usage, tenants

__all__ = ["account_name", "add_usage", "letter_accounts", "lock_usage"]


def account_name(account: str) -> str:
    return f"tenant {account!r}" if account else "letters of no known tenant"


async def letter_accounts(
    connection: AsyncConnection, letters: Sequence[NewDeadLetter]
) -> list[str]:
    """The account of each letter: its own, or the tenant of its producer user, or ''."""
    users = {letter.account_user for letter in letters if letter.account_user}
    owners: dict[str, str] = {}
    if users:
        result = await connection.execute(
            select(tenants.c.broker_user, tenants.c.name).where(
                tenants.c.broker_user.in_(sorted(users))
            )
        )
        owners = {row.broker_user: row.name for row in result}
    return [
        owners.get(letter.account_user, "") if letter.account_user else letter.account or ""
        for letter in letters
    ]


async def lock_usage(connection: AsyncConnection, accounts: Iterable[str]) -> dict[str, int]:
    """Lock the accounts' usage rows (made if missing, in one order: no deadlocks between
    archivers) and return the bytes each holds."""
    names = sorted(set(accounts))
    u = dead_letter_usage.c
    await connection.execute(
        insert(dead_letter_usage).values([{"account": n} for n in names]).on_conflict_do_nothing()
    )
    result = await connection.execute(
        select(u.account, u.bytes).where(u.account.in_(names)).order_by(u.account).with_for_update()
    )
    return {row.account: int(row.bytes) for row in result}


async def add_usage(connection: AsyncConnection, changes: Iterable[tuple[str, int, int]]) -> None:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for account, letters, size in changes:
        totals[account][0] += letters
        totals[account][1] += size
    if not totals:
        return
    u = dead_letter_usage.c
    await connection.execute(
        update(dead_letter_usage)
        .where(u.account == bindparam("acc"))
        .values(letters=u.letters + bindparam("n"), bytes=u.bytes + bindparam("b")),
        [{"acc": a, "n": n, "b": b} for a, (n, b) in sorted(totals.items())],
    )
