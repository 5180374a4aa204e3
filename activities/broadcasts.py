"""Broadcasts: fix the audience when sending starts, then send batch by batch through the
journeys' send core (``MessagingActivities._send``: suppression checked at send time,
frequency caps, one message row per business key before the provider is called).

The business key of a broadcast's message is ``broadcast:<broadcast id>:<contact id>``;
the unique index on ``messages.idempotency_key`` makes it one message per contact, ever,
whatever retries or crashes happen. ``broadcast_recipients`` is the audience and each
contact's outcome, counted once on the broadcast row in the same transaction.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo, available_timezones

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.messaging import MessagingActivities
from activities.providers import ProviderRetryable
from models.campaigns import (
    FailRecipientsInput,
    FixBroadcastAudienceInput,
    FixBroadcastAudienceResult,
    SendBroadcastBatchInput,
    SendBroadcastBatchResult,
    SetBroadcastStatusInput,
    ZoneGroup,
)
from models.contracts import SendMessageInput
from models.db import session_scope
from models.schedule import local_moment
from models.tables import (
    Broadcast,
    BroadcastRecipient,
    BroadcastStatus,
    Contact,
    Message,
    MessageChannel,
    MessageStatus,
    Segment,
    SegmentMember,
    utcnow,
)
from settings import Settings

ALL_ZONES = "*"  # the one group of a broadcast sent at one moment for everyone
TERMINAL = {BroadcastStatus.completed, BroadcastStatus.cancelled, BroadcastStatus.failed}
# Each outcome and the broadcast counter it adds to (unconfirmed: may have been sent).
_COUNTER = {"sent": "sent", "unconfirmed": "sent", "skipped": "skipped", "failed": "failed"}


def message_key(broadcast_id: str, contact_id: str) -> str:
    return f"broadcast:{broadcast_id}:{contact_id}"


def release_moment(local_time: str, zone: str) -> datetime:
    """``local_time`` (an ISO local date-time) as it happens in ``zone``; a wall time in a
    DST gap moves to the next valid minute, as for journeys."""
    wall = datetime.fromisoformat(local_time)
    return local_moment(wall.date(), wall.time(), ZoneInfo(zone))


class BroadcastActivities:
    def __init__(self, settings: Settings, messaging: MessagingActivities) -> None:
        self.settings = settings
        self.database_url = settings.database_url
        self.messaging = messaging

    @activity.defn(name="fix_broadcast_audience")
    async def fix_broadcast_audience(
        self, input: FixBroadcastAudienceInput
    ) -> FixBroadcastAudienceResult:
        """Copy the segment's members into the recipients with the zone each one's local
        time is judged in (the contact's, else the broadcast's default, else UTC), once."""
        broadcast_id = uuid.UUID(input.broadcast_id)
        async with session_scope(self.database_url) as session:
            broadcast = await session.get(Broadcast, broadcast_id, with_for_update=True)
            if broadcast is None:
                raise ApplicationError(f"no broadcast {broadcast_id}", non_retryable=True)
            fallback = broadcast.default_timezone or "UTC"
            if broadcast.total is None:
                segment = (
                    await session.exec(select(Segment).where(Segment.key == broadcast.segment_key))
                ).first()
                if segment is None:
                    raise ApplicationError(
                        f"no segment {broadcast.segment_key!r}", non_retryable=True
                    )
                zone = sa.func.coalesce(
                    sa.func.nullif(sa.func.trim(Contact.timezone), ""), fallback
                )
                members = (
                    select(sa.literal(broadcast_id, sa.Uuid), SegmentMember.contact_id, zone)
                    .join(Contact, col(Contact.id) == SegmentMember.contact_id)
                    .where(SegmentMember.segment_id == segment.id)
                    .where(col(Contact.erased_at).is_(None))
                )
                connection = await session.connection()
                await connection.execute(
                    insert(BroadcastRecipient)
                    .from_select(["broadcast_id", "contact_id", "zone"], members)
                    .on_conflict_do_nothing()
                )
                # An unknown zone name counts as absent (the journeys' time rule).
                known = sa.bindparam("known", sorted(available_timezones()), type_=ARRAY(sa.Text))
                await connection.execute(
                    sa.update(BroadcastRecipient)
                    .where(col(BroadcastRecipient.broadcast_id) == broadcast_id)
                    .where(sa.not_(col(BroadcastRecipient.zone) == sa.any_(known)))
                    .values(zone=fallback)
                )
                broadcast.total = (
                    await session.exec(
                        select(sa.func.count()).where(
                            BroadcastRecipient.broadcast_id == broadcast_id
                        )
                    )
                ).one()
                if broadcast.status == BroadcastStatus.scheduled:  # paused stays paused
                    broadcast.status = BroadcastStatus.sending
                broadcast.started_at = utcnow()
                session.add(broadcast)
            total = broadcast.total
            now = datetime.fromisoformat(input.now)
            if broadcast.local_time is None:
                return FixBroadcastAudienceResult(
                    total, [ZoneGroup(ALL_ZONES, now.isoformat(), total)]
                )
            rows = (
                await session.exec(
                    select(BroadcastRecipient.zone, sa.func.count())
                    .where(BroadcastRecipient.broadcast_id == broadcast_id)
                    .group_by(col(BroadcastRecipient.zone))
                )
            ).all()
        groups = [
            ZoneGroup(zone, release_moment(broadcast.local_time, zone).isoformat(), count)
            for zone, count in rows
        ]
        groups.sort(key=lambda g: (datetime.fromisoformat(g.release_at), g.zone))
        return FixBroadcastAudienceResult(total, groups)

    @activity.defn(name="send_broadcast_batch")
    async def send_broadcast_batch(
        self, input: SendBroadcastBatchInput
    ) -> SendBroadcastBatchResult:
        """Send to the next ``limit`` pending recipients of a zone group.

        The workflow grants ``limit`` from its token bucket; every provider call of this
        attempt is one of them. A retryable provider error is left to the workflow (this
        activity is not retried by Temporal, so a retry is a new batch under the bucket):
        the others of the batch finish, the failing contacts keep their turn.
        """
        broadcast_id = uuid.UUID(input.broadcast_id)
        async with session_scope(self.database_url) as session:
            broadcast = await session.get(Broadcast, broadcast_id)
            if broadcast is None:
                raise ApplicationError(f"no broadcast {broadcast_id}", non_retryable=True)
            query = (
                select(BroadcastRecipient.contact_id)
                .where(BroadcastRecipient.broadcast_id == broadcast_id)
                .where(col(BroadcastRecipient.outcome).is_(None))
                .order_by(col(BroadcastRecipient.contact_id))
                .limit(input.limit)
            )
            if input.zone != ALL_ZONES:
                query = query.where(BroadcastRecipient.zone == input.zone)
            if input.after:
                query = query.where(col(BroadcastRecipient.contact_id) > uuid.UUID(input.after))
            contact_ids = list((await session.exec(query)).all())
        channel = MessageChannel(broadcast.channel)
        gate = asyncio.Semaphore(self.settings.broadcast_send_concurrency)
        stop: list[str] = []
        retry_errors: list[ProviderRetryable] = []
        taken = 0

        async def one(contact_id: uuid.UUID) -> None:
            nonlocal taken
            async with gate:
                if stop:
                    return
                taken += 1
                send = SendMessageInput(
                    idempotency_key=message_key(input.broadcast_id, str(contact_id)),
                    enrollment_id="",
                    contact_id=str(contact_id),
                    journey_key="",
                    journey_version=0,
                    step_id="broadcast",
                    template=broadcast.template_key,
                    now=input.now,
                    default_timezone=broadcast.default_timezone,
                    broadcast_id=input.broadcast_id,
                )
                try:
                    result = await self.messaging._send(channel, send)
                except ProviderRetryable as err:
                    retry_errors.append(err)
                    await self._note_attempt(broadcast_id, contact_id, str(err))
                    return
                # A message already further on (delivered, opened...) was sent by an
                # earlier attempt whose outcome was not recorded.
                outcome = result.status if result.status in _COUNTER else "sent"
                await self._record(
                    broadcast_id, contact_id, outcome, result, datetime.fromisoformat(input.now)
                )
                if outcome == "failed" and input.stop_on_rejection:
                    stop.append(f"contact {contact_id}: {result.reason}")
            activity.heartbeat(str(contact_id))

        outcomes = await asyncio.gather(*(one(c) for c in contact_ids), return_exceptions=True)
        crashed = [o for o in outcomes if isinstance(o, BaseException)]
        if crashed:
            raise crashed[0]  # the others of the batch finished; their outcomes are stored
        async with session_scope(self.database_url) as session:
            refreshed = await session.get(Broadcast, broadcast_id)
            assert refreshed is not None
            pending = select(BroadcastRecipient.contact_id).where(
                BroadcastRecipient.broadcast_id == broadcast_id,
                col(BroadcastRecipient.outcome).is_(None),
            )
            if input.zone != ALL_ZONES:
                pending = pending.where(BroadcastRecipient.zone == input.zone)
            left = (await session.exec(pending.limit(1))).first()
        if retry_errors:
            # The workflow backs off and tries again (and applies the error policy when it
            # keeps failing); recipients done in this batch stay done.
            raise ApplicationError(
                f"provider unavailable: {retry_errors[0]}", type="ProviderRetryable"
            )
        return SendBroadcastBatchResult(
            last_contact_id=str(contact_ids[-1]) if contact_ids and not stop else input.after,
            attempted=taken,
            done=left is None,
            sent=refreshed.sent,
            skipped=refreshed.skipped,
            failed=refreshed.failed,
            rejected=stop[0] if stop else None,
        )

    async def _record(
        self,
        broadcast_id: uuid.UUID,
        contact_id: uuid.UUID,
        outcome: str,
        result: object,
        released_at: datetime,
    ) -> None:
        """Set the recipient's outcome once and count it in the same transaction."""
        message_id = getattr(result, "message_id", None)
        reason = getattr(result, "reason", None)
        async with session_scope(self.database_url) as session:
            await _set_outcome(
                session,
                broadcast_id,
                [contact_id],
                outcome,
                reason,
                uuid.UUID(message_id) if message_id else None,
                released_at,
            )

    async def _note_attempt(
        self, broadcast_id: uuid.UUID, contact_id: uuid.UUID, error: str
    ) -> None:
        async with session_scope(self.database_url) as session:
            await (await session.connection()).execute(
                sa.update(BroadcastRecipient)
                .where(col(BroadcastRecipient.broadcast_id) == broadcast_id)
                .where(col(BroadcastRecipient.contact_id) == contact_id)
                .values(attempts=col(BroadcastRecipient.attempts) + 1, reason=error[:500])
            )

    @activity.defn(name="fail_broadcast_recipients")
    async def fail_broadcast_recipients(self, input: FailRecipientsInput) -> int:
        """Error policy ``skip`` after retries ran out: the contacts whose sends kept failing
        are recorded failed (their message rows too, if the provider never took them)."""
        broadcast_id = uuid.UUID(input.broadcast_id)
        async with session_scope(self.database_url) as session:
            query = (
                select(BroadcastRecipient.contact_id)
                .where(BroadcastRecipient.broadcast_id == broadcast_id)
                .where(col(BroadcastRecipient.outcome).is_(None))
                .where(col(BroadcastRecipient.attempts) > 0)
            )
            if input.zone != ALL_ZONES:
                query = query.where(BroadcastRecipient.zone == input.zone)
            failing = list((await session.exec(query)).all())
            keys = [message_key(input.broadcast_id, str(c)) for c in failing]
            if keys:
                await (await session.connection()).execute(
                    sa.update(Message)
                    .where(col(Message.idempotency_key).in_(keys))
                    .where(col(Message.status) == MessageStatus.pending)
                    .values(status=MessageStatus.failed, error=input.reason, failed_at=utcnow())
                )
            await _set_outcome(session, broadcast_id, failing, "failed", input.reason, None, None)
            return len(failing)

    @activity.defn(name="set_broadcast_status")
    async def set_broadcast_status(self, input: SetBroadcastStatusInput) -> None:
        """Record the broadcast's status; a finished broadcast keeps its end."""
        async with session_scope(self.database_url) as session:
            new = BroadcastStatus(input.status)
            values: dict[str, object] = {"status": new, "status_reason": input.reason}
            if new in TERMINAL:
                values["finished_at"] = utcnow()
            await (await session.connection()).execute(
                sa.update(Broadcast)
                .where(col(Broadcast.id) == uuid.UUID(input.broadcast_id))
                .where(col(Broadcast.status).not_in(list(TERMINAL)))
                .values(values)
            )


async def _set_outcome(
    session: AsyncSession,
    broadcast_id: uuid.UUID,
    contact_ids: list[uuid.UUID],
    outcome: str,
    reason: str | None,
    message_id: uuid.UUID | None,
    released_at: datetime | None,
) -> None:
    if not contact_ids:
        return
    connection = await session.connection()
    values: dict[str, object] = {"outcome": outcome, "reason": reason, "done_at": utcnow()}
    if message_id is not None:
        values["message_id"] = message_id
    if released_at is not None:
        values["released_at"] = released_at
    changed = await connection.execute(
        sa.update(BroadcastRecipient)
        .where(col(BroadcastRecipient.broadcast_id) == broadcast_id)
        .where(col(BroadcastRecipient.contact_id).in_(contact_ids))
        .where(col(BroadcastRecipient.outcome).is_(None))
        .values(values)
        .returning(col(BroadcastRecipient.contact_id))
    )
    count = len(changed.all())
    if count:
        counter = _COUNTER[outcome]
        await connection.execute(
            sa.update(Broadcast)
            .where(col(Broadcast.id) == broadcast_id)
            .values({counter: getattr(Broadcast, counter) + count})
        )
    await session.commit()
