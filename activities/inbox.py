"""The inbox drain: delivers events that were stored but never reached the journeys.

The API commits every event before acknowledging it, then delivers it at once; when
Temporal is down (or the API dies in between) the event stays with ``delivered_at`` NULL.
Each worker process runs a drain that, every few seconds, claims a batch of such events
older than a grace period (so it does not race the API's own delivery) with
``FOR UPDATE SKIP LOCKED``, so drains on many hosts never claim the same event, delivers
them as the API would, and marks them delivered in the claiming transaction.

An event that fails for another reason than Temporal being unreachable (a bad row, a bug)
is tried again later, each time later (``retry_base_seconds`` doubling), so it never holds
up the events behind it; after ``max_attempts`` it is parked: ``delivery_parked_at`` set
and ``delivery_error`` saying why, for an operator to look at. Each round first starts the
journeys of enrollments whose start failed (``start_unstarted``), so the events for them
can be delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import timedelta
from types import TracebackType

import sqlalchemy as sa
import sqlalchemy.exc
from sqlmodel import col, select
from temporalio.client import Client

from activities.delivery import refresh_after_event, signal_and_start, temporal_unavailable
from activities.enrollments import start_unstarted
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
        max_attempts: int = 10,
        retry_base_seconds: float = 5.0,
        max_retry_seconds: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.temporal = temporal
        self.poll_seconds = poll_seconds
        self.grace = grace
        self.batch_size = batch_size
        self.max_backoff_seconds = max_backoff_seconds
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.max_retry_seconds = max_retry_seconds
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def drain_once(self) -> list[uuid.UUID]:
        """Claim one batch and deliver it; return the ids of the events delivered.

        Raises what Temporal raised when it is unreachable, after marking the events
        delivered before it. Each event's signals and triggered starts run in their own
        session (they commit); the claim holds the row locks until the batch is marked.
        """
        delivered: list[uuid.UUID] = []
        async with session_scope(self.settings.database_url) as session:
            await start_unstarted(
                session,
                self.temporal,
                self.settings,
                older_than=self.grace,
                limit=self.batch_size,
            )
        async with session_scope(self.settings.database_url) as claim:
            now = utcnow()
            events = (
                await claim.exec(
                    select(Event)
                    .where(col(Event.delivered_at).is_(None))
                    .where(col(Event.received_at) < now - self.grace)
                    .where(col(Event.delivery_parked_at).is_(None))
                    # Events that failed wait their turn, so they never block the others.
                    .where(
                        sa.or_(
                            col(Event.next_delivery_at).is_(None),
                            col(Event.next_delivery_at) <= now,
                        )
                    )
                    .order_by(col(Event.received_at))
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            try:
                for event in events:
                    failure = await self._deliver(event)
                    if failure is None:
                        event.delivered_at = utcnow()
                        delivered.append(event.id)
                    else:
                        self._count_failure(event, failure)
                    claim.add(event)
            finally:
                # Marks what got through even when Temporal failed part-way.
                await claim.commit()
        if delivered:
            log.info("inbox drain delivered %d event(s)", len(delivered))
        return delivered

    async def _deliver(self, event: Event) -> Exception | None:
        """Deliver one claimed event; return the error if it failed for a reason other
        than Temporal or the database being unreachable (those end the round)."""
        try:
            async with session_scope(self.settings.database_url) as work:
                await signal_and_start(work, self.temporal, self.settings, event)
                await refresh_after_event(work, self.temporal, self.settings, event)
        except Exception as err:
            if temporal_unavailable(err) or isinstance(err, _DATABASE_DOWN):
                raise
            log.warning("inbox drain could not deliver event %s: %r", event.id, err)
            return err
        return None

    def _count_failure(self, event: Event, err: Exception) -> None:
        """Record a failed try: retry later (doubling), or park after ``max_attempts``."""
        now = utcnow()
        event.delivery_attempts += 1
        event.delivery_error = f"{type(err).__name__}: {err}"[:2000]
        if event.delivery_attempts >= self.max_attempts:
            event.delivery_parked_at = now
            event.next_delivery_at = None
            log.error(
                "inbox drain parked event %s after %d attempts: %s",
                event.id,
                event.delivery_attempts,
                event.delivery_error,
            )
        else:
            delay = self.retry_base_seconds * 2 ** (event.delivery_attempts - 1)
            event.next_delivery_at = now + timedelta(seconds=min(delay, self.max_retry_seconds))

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
