"""The inbox drain: delivers events that were stored but never reached the journeys.

The API commits every event before acknowledging it, then delivers it at once; when
Temporal is down (or the API dies in between) the event stays with ``delivered_at`` NULL.
Each worker process runs a drain that, every few seconds, claims a batch of such events
older than a grace period (so it does not race the API's own delivery) with
``FOR UPDATE SKIP LOCKED``, so drains on many hosts never claim the same event, delivers
them as the API would, and marks them delivered in the claiming transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import timedelta
from types import TracebackType

import sqlalchemy.exc
from sqlmodel import col, select
from temporalio.client import Client

from activities.delivery import refresh_after_event, signal_and_start, temporal_unavailable
from models.db import session_scope
from models.tables import Event, utcnow
from settings import Settings

log = logging.getLogger(__name__)
# Failures that end the round (every event would fail alike), unlike one bad event.
_DATABASE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


class InboxDrain:
    """Deliver undelivered events, round after round, until stopped.

    Use ``async with InboxDrain(...)`` to run it beside a worker, or ``drain_once`` to run
    a single round. Temporal unreachable: the round stops, its events stay undelivered,
    and the next rounds wait longer (doubling up to ``max_backoff_seconds``).
    """

    def __init__(
        self,
        settings: Settings,
        temporal: Client,
        *,
        poll_seconds: float = 2.0,
        grace: timedelta = timedelta(seconds=5),
        batch_size: int = 100,
        max_backoff_seconds: float = 60.0,
    ) -> None:
        self.settings = settings
        self.temporal = temporal
        self.poll_seconds = poll_seconds
        self.grace = grace
        self.batch_size = batch_size
        self.max_backoff_seconds = max_backoff_seconds
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def drain_once(self) -> list[uuid.UUID]:
        """Claim one batch and deliver it; return the ids of the events delivered.

        Raises what Temporal raised when it is unreachable, after marking the events
        delivered before it. Each event's signals and triggered starts run in their own
        session (they commit); the claim holds the row locks until the batch is marked.
        """
        delivered: list[uuid.UUID] = []
        async with session_scope(self.settings.database_url) as claim:
            events = (
                await claim.exec(
                    select(Event)
                    .where(col(Event.delivered_at).is_(None))
                    .where(col(Event.received_at) < utcnow() - self.grace)
                    .order_by(col(Event.received_at))
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            try:
                for event in events:
                    if await self._deliver(event):
                        event.delivered_at = utcnow()
                        claim.add(event)
                        delivered.append(event.id)
            finally:
                # Marks what got through even when Temporal failed part-way.
                await claim.commit()
        if delivered:
            log.info("inbox drain delivered %d event(s)", len(delivered))
        return delivered

    async def _deliver(self, event: Event) -> bool:
        """Deliver one claimed event; False if it failed for a reason other than Temporal
        being unreachable (logged; it stays undelivered and is tried again next round)."""
        try:
            async with session_scope(self.settings.database_url) as work:
                await signal_and_start(work, self.temporal, self.settings, event)
                await refresh_after_event(work, self.temporal, self.settings, event)
        except Exception as err:
            if temporal_unavailable(err) or isinstance(err, _DATABASE_DOWN):
                raise
            log.exception("inbox drain could not deliver event %s", event.id)
            return False
        return True

    async def run(self) -> None:
        """Drain until ``stop``; a full batch is followed at once by the next."""
        backoff = self.poll_seconds
        while not self._stop.is_set():
            wait = self.poll_seconds
            try:
                if len(await self.drain_once()) >= self.batch_size:
                    wait = 0
                backoff = self.poll_seconds
            except Exception as err:
                wait = backoff
                if temporal_unavailable(err):
                    log.warning(
                        "inbox drain: Temporal unreachable (%s); retry in %.0fs", err, backoff
                    )
                else:
                    log.exception("inbox drain round failed; retry in %.0fs", wait)
                backoff = min(backoff * 2, self.max_backoff_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self.run(), name="inbox-drain")

    async def stop(self, patience_seconds: float = 10.0) -> None:
        """Stop after the current round (its marks are committed), or cancel the round
        after ``patience_seconds`` (it rolls back: its events are delivered again later,
        which journeys ignore)."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(task, patience_seconds)
            except TimeoutError:
                log.warning("inbox drain round cancelled at shutdown")

    async def __aenter__(self) -> InboxDrain:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
