"""The dead-letter archiver: every worker moves letters from the dead-letter queue into
PostgreSQL, where operators search and replay them (`stepfleet dlq`).

The insert commits before the ack, and each letter has a key of its own, so a letter
redelivered after a crash is archived once: it is always in the queue or in the archive.
What is recorded of each letter, and who is believed to have sent it, is
`dead_letter_records.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery
from stepfleet.cycle.work import state_of
from stepfleet.engine import Admit, admit
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.schemas import InvalidMessage, MessageKind, parse_envelope
from stepfleet.store import Archived, InstanceRecord, NewDeadLetter, PgStore, StoreUnavailable
from stepfleet.workers.dead_letter_records import ArchivePolicy, letter_of, minimal_letter
from stepfleet.workers.logs import first_line

log = structlog.get_logger("stepfleet.archive")

_BATCH = 100
_WAIT_SECONDS = 0.2
_RETRY_SECONDS = 1.0
# A letter the database refuses even as a minimal record is held unacked for a while, then
# handed back: never lost, tried again a minute later rather than in a tight loop.
_HOLD_SECONDS = 60.0
_HOLD_MAX = 50


class DeadLetterArchiver:
    """Takes deliveries from the dead-letter queue and archives them in batches."""

    def __init__(
        self, store: PgStore, policy: ArchivePolicy, observer: Observer = NO_OBSERVER
    ) -> None:
        self._store = store
        self._policy = policy
        self._observer = observer
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._held: set[asyncio.Task[None]] = set()
        self.archived = 0
        self.truncated = 0
        """Letters archived with only a prefix of their body (over the size limit)."""
        self.stripped = 0
        """Letters archived without body and headers (their tenant's archive was full)."""
        self.minimal = 0
        """Letters the database refused as they were, archived as minimal records."""
        self.stalled = 0
        """Instances this archiver marked stalled."""

    async def on_delivery(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)

    async def run(self) -> None:
        """Archive until cancelled; a batch that cannot be stored is handed back to the queue."""
        try:
            while True:
                batch = [await self._inbox.get()]
                try:
                    async with asyncio.timeout(_WAIT_SECONDS):
                        while len(batch) < _BATCH:
                            batch.append(await self._inbox.get())
                except TimeoutError:
                    pass
                await self._archive(batch)
        finally:
            for task in self._held:  # what they hold goes back to the queue with the channel
                task.cancel()

    async def _archive(self, batch: list[Delivery]) -> None:
        letters = [self._letter(d) for d in batch]
        try:
            archived = await self._store.dead_letters.archive(
                letters, account_bytes=self._policy.account_bytes, stalls=self._stalls
            )
        except StoreUnavailable as exc:  # keep serving: the queue keeps what was not archived
            log.warning("dead_letters_not_archived", count=len(batch), error=str(exc))
            await self._hand_back(batch)
            return
        except Exception as exc:
            # The database refused something in the batch: store the letters one by one, so
            # one letter it cannot take holds up no other.
            log.warning("dead_letter_batch_refused", count=len(batch), error=first_line(exc))
            await self._one_by_one(batch, letters)
            return
        self._note(letters, archived)
        for delivery in batch:
            # A delivery of a lost channel is redelivered (its letter key makes that a no-op);
            # the others may have come on a channel opened since, and are still acked.
            with contextlib.suppress(BrokerUnavailable):
                await delivery.ack()
        log.info("dead_letters_archived", count=archived.new, repeats=len(batch) - archived.new)

    async def _one_by_one(self, batch: list[Delivery], letters: list[NewDeadLetter]) -> None:
        for index, (delivery, letter) in enumerate(zip(batch, letters, strict=True)):
            try:
                archived = await self._store_alone(delivery, letter)
            except StoreUnavailable as exc:
                log.warning("dead_letters_not_archived", count=len(batch) - index, error=str(exc))
                await self._hand_back(batch[index:])
                return
            if archived is None:
                await self._hold(delivery)
                continue
            self._note([letter], archived)
            with contextlib.suppress(BrokerUnavailable):
                await delivery.ack()

    async def _store_alone(self, delivery: Delivery, letter: NewDeadLetter) -> Archived | None:
        """Archive one letter, else a minimal record of it; None: not even that."""
        bound = self._policy.account_bytes
        try:
            return await self._store.dead_letters.archive(
                [letter], account_bytes=bound, stalls=self._stalls
            )
        except StoreUnavailable:
            raise
        except Exception as exc:
            minimal = minimal_letter(delivery, self._policy, exc, letter)
            log.warning(
                "dead_letter_archived_minimal",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                letter_key=minimal.letter_key,
                error=first_line(exc),
            )
        try:
            archived = await self._store.dead_letters.archive([minimal], account_bytes=bound)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.error(
                "dead_letter_unarchivable",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                letter_key=minimal.letter_key,
                body_bytes=minimal.body_size,
                body_sha256=minimal.body_sha256,
                error=first_line(exc),
            )
            return None
        self.minimal += archived.new
        return archived

    async def _hold(self, delivery: Delivery) -> None:
        if len(self._held) >= _HOLD_MAX:
            await self._hand_back([delivery])
            return
        task = asyncio.create_task(self._release_later(delivery))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _release_later(self, delivery: Delivery) -> None:
        await asyncio.sleep(_HOLD_SECONDS)
        with contextlib.suppress(BrokerUnavailable):
            await delivery.release()

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(BrokerUnavailable):  # a lost channel's are requeued
                await delivery.release()
        await asyncio.sleep(_RETRY_SECONDS)

    def _letter(self, delivery: Delivery) -> NewDeadLetter:
        try:
            return letter_of(delivery, self._policy)
        except Exception as exc:  # a letter we cannot read is kept raw, never dropped
            log.exception("dead_letter_unreadable")
            return minimal_letter(delivery, self._policy, exc)

    def _stalls(self, letter: NewDeadLetter, instance: InstanceRecord) -> bool:
        """Whether the letter held the instance's next move: a step or wake the fleet sent
        (through the internal exchange, which producers cannot write to) that the engine
        would run if it were delivered now. A stale copy (an older position, generation,
        attempt or timer), a letter for a paused or finished instance, and anything a
        producer sent never mark an instance."""
        if letter.first_exchange != self._policy.topology.internal_exchange:
            return False
        try:
            envelope = parse_envelope(
                letter.headers, letter.body, max_body_bytes=self._policy.max_body_bytes
            )
        except InvalidMessage:
            return False
        if envelope.kind not in (MessageKind.STEP, MessageKind.WAKE):
            return False
        if (envelope.tenant, envelope.instance_id) != (
            instance.key.tenant,
            instance.key.instance_id,
        ):
            return False
        verdict = admit(envelope, state_of(instance), created_now=False, now=datetime.now(UTC))
        return isinstance(verdict, Admit)

    def _note(self, letters: list[NewDeadLetter], archived: Archived) -> None:
        self.archived += archived.new
        if self._observer.counting:
            label = self._observer.tenant
            self._observer.archived(Counter((label(x.tenant or ""), x.reason) for x in letters))
        self.stripped += len(archived.stripped)
        self.stalled += len(archived.stalled)
        for stalled in archived.stalled:
            instance = stalled.instance
            log.warning(
                "instance_stalled",
                tenant=instance.key.tenant,
                instance=instance.key.instance_id,
                module_digest=instance.module,
                position=instance.position,
                letter=stalled.letter_id,
                reason=stalled.letter.reason,
                kind=stalled.letter.kind,
            )
        for letter in archived.stripped:
            log.warning(
                "dead_letter_body_not_kept",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                body_bytes=letter.body_size,
                bound=self._policy.account_bytes,
            )
        for letter in letters:
            if letter.body_size is not None and letter.body_size > len(letter.body):
                self.truncated += 1
                log.info(
                    "dead_letter_body_truncated",
                    tenant=letter.tenant,
                    instance=letter.instance_id,
                    reason=letter.reason,
                    body_bytes=letter.body_size,
                    kept=len(letter.body),
                )
