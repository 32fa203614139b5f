"""Moving running instances to other code: a dry run that replays each journal against the
new module, and the move itself (instances stay on their digest until an operator moves them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import structlog

from stepfleet.control.actions import ControlError
from stepfleet.control.audit import operator_name
from stepfleet.control.wasm_thread import on_wasm_thread
from stepfleet.cycle.guest import run_step
from stepfleet.cycle.replays import CachedReplay
from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import InvalidModule, ReplayJournal, Sandbox, SandboxLimits, WasmSandbox
from stepfleet.schemas import (
    ErrorKind,
    GuestCrashed,
    InstanceKey,
    InstanceStatus,
    Nondeterministic,
    TenantLimits,
)
from stepfleet.store import AuditEntry, InstanceRecord, PgStore

log = structlog.get_logger("stepfleet.control")

_NO_CALLS = TenantLimits(host_calls_per_step=0)

_LIVE = (
    InstanceStatus.RUNNING,
    InstanceStatus.SLEEPING,
    InstanceStatus.WAITING,
    InstanceStatus.PAUSED,
    InstanceStatus.QUEUED,
)


class Verdict(StrEnum):
    """What replaying an instance's journal against the new module showed."""

    COMPATIBLE = "compatible"
    NONDETERMINISTIC = "nondeterministic"
    FAILS = "fails"


@dataclass(frozen=True, slots=True)
class MoveCheck:
    """One instance's replay against the target module."""

    key: InstanceKey
    module: str
    verdict: Verdict
    detail: str = ""
    moved: bool = False


class ModuleMoves:
    """Dry runs and moves of a tenant's running instances between module digests."""

    def __init__(self, store: PgStore, sandbox: Sandbox, *, actor: str | None = None) -> None:
        self._store = store
        self._sandbox = sandbox
        self.actor = actor or operator_name()

    async def check(
        self, tenant: str, to: str, *, from_module: str | None = None, limit: int = 10_000
    ) -> list[MoveCheck]:
        """Replay every live instance of the tenant (of `from_module`) against `to`."""
        await self._load(tenant, to)
        candidates = await self._store.list_instances(
            tenant, statuses=_LIVE, module=from_module, limit=limit
        )
        return [await self._check_one(record, to) for record in candidates if record.module != to]

    async def move(
        self, tenant: str, to: str, *, from_module: str | None = None, force: bool = False
    ) -> list[MoveCheck]:
        """Move the compatible instances (all of them with `force`) to `to`."""
        results = []
        for check in await self.check(tenant, to, from_module=from_module):
            if check.verdict is not Verdict.COMPATIBLE and not force:
                results.append(check)
                continue
            async with self._store.control() as tx:
                record = await tx.lock(check.key)
                moved = (
                    record is not None
                    and record.module == check.module
                    and not record.status.is_final
                )
                if moved:
                    await tx.set_module(check.key, to)
                    await tx.audit(
                        AuditEntry(
                            self.actor,
                            "module-move",
                            f"{check.key.tenant}/{check.key.instance_id}",
                            filter={"tenant": tenant, "from": from_module, "to": to},
                            detail=f"{check.module} -> {to} ({check.verdict.value})",
                        )
                    )
            if moved:
                log.info(
                    "instance_moved",
                    tenant=tenant,
                    instance=check.key.instance_id,
                    module_digest=to,
                    from_module=check.module,
                    verdict=check.verdict.value,
                )
            results.append(
                MoveCheck(check.key, check.module, check.verdict, check.detail, moved=moved)
            )
        return results

    async def _load(self, tenant: str, to: str) -> None:
        owned = {digest for digest, _, _ in await self._store.tenant_modules(tenant)}
        if to not in owned:
            raise ControlError(f"module {to} was never pushed for tenant {tenant}")
        if not self._sandbox.is_loaded(to):
            wasm = (await self._store.module_bytes([to]))[to]
            try:
                await on_wasm_thread(lambda: self._sandbox.load(to, wasm))
            except InvalidModule as exc:
                raise ControlError(f"module {to} cannot run here: {exc}") from None

    async def _check_one(self, record: InstanceRecord, to: str) -> MoveCheck:
        detail = await self._store.detail(record.key)
        if detail is None:  # deleted meanwhile
            return MoveCheck(record.key, record.module, Verdict.FAILS, "instance is gone")
        # The replay the cycle would make, with the new module, on the committed journal.
        replay = CachedReplay(record.generation, detail.params, ReplayJournal(detail.journal))
        state = InstanceState(
            record.key,
            to,
            record.status,
            len(replay.journal),
            attempt=record.attempt,
            mode=record.mode,
            end_status=record.end_status,
            error=record.error,
        )
        # A dry run calls out to nobody: the step it reaches runs with no HTTP calls allowed.
        report = await on_wasm_thread(
            lambda: run_step(self._sandbox, state, replay, limits=_NO_CALLS)
        )
        now = datetime.now(UTC)
        decision = decide(
            state,
            replay.journal.entries,
            report,
            started_at=now,
            finished_at=now,
            limits=EngineLimits(),
        )
        if (
            isinstance(report.outcome, Nondeterministic)
            or decision.error_kind is ErrorKind.NONDETERMINISM
        ):
            return MoveCheck(
                record.key, record.module, Verdict.NONDETERMINISTIC, decision.error or ""
            )
        if decision.status is InstanceStatus.ERRORED or isinstance(report.outcome, GuestCrashed):
            return MoveCheck(record.key, record.module, Verdict.FAILS, decision.error or "")
        return MoveCheck(record.key, record.module, Verdict.COMPATIBLE)


async def move_module(
    store: PgStore,
    limits: SandboxLimits,
    tenant: str,
    to: str,
    *,
    from_module: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    actor: str | None = None,
) -> list[MoveCheck]:
    """A dry run (`dry_run`: nothing changes) or a move of a tenant's live instances to `to`,
    in a sandbox of its own under `limits`.

    Raises:
        ControlError: `to` was never pushed for the tenant, or cannot run here.
    """
    sandbox = WasmSandbox(limits)
    try:
        moves = ModuleMoves(store, sandbox, actor=actor)
        if dry_run:
            return await moves.check(tenant, to, from_module=from_module)
        return await moves.move(tenant, to, from_module=from_module, force=force)
    finally:
        sandbox.close()
