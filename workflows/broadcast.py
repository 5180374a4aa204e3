"""BroadcastWorkflow: one template to a segment, once, at a steady rate.

One run per broadcast (``broadcast/<id>``). It waits for ``send_at`` on a durable timer
(a one-time send needs no Temporal Schedule: a timer in the broadcast's own workflow is
cancelled with it, shows as "scheduled" in its progress, and runs on the time-skipping
test server), fixes the audience, then releases each zone group at its moment (local-time
delivery: the same wall-clock time in each contact's zone) and sends in batches granted by
a token bucket kept in the workflow.

The bucket holds at most ``burst`` tokens and refills at ``rate_per_second`` only while no
batch is in flight; each recipient a batch takes costs one token, and every provider call
belongs to a granted batch (the batch activity is never retried by Temporal: a retry is a
new batch). So in any window of W seconds at most ``burst + rate * W`` sends leave.

Pause and resume are signals (the batch under way finishes first); cancelling the workflow
cancels the broadcast. The error policy applies when a send is refused for good or the
provider keeps failing: ``skip`` records that contact failed and goes on, ``pause`` pauses
the broadcast for an operator to resume.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.broadcasts import BroadcastActivities
    from models.campaigns import (
        BroadcastControl,
        BroadcastInput,
        BroadcastProgress,
        FailRecipientsInput,
        FixBroadcastAudienceInput,
        SendBroadcastBatchInput,
        SetBroadcastStatusInput,
        ZoneGroup,
    )

# Zones run from UTC-12 to UTC+14: the first local 09:00 on earth is 14 hours before 09:00 UTC.
EARLIEST_OFFSET = timedelta(hours=14)
# A failing batch is tried again after 1 s, 2 s, 4 s... up to a minute, this many times.
BATCH_ATTEMPTS = 6
BOOKKEEPING = RetryPolicy(maximum_interval=timedelta(minutes=1))


@workflow.defn(name="Broadcast")
class BroadcastWorkflow:
    @workflow.init
    def __init__(self, input: BroadcastInput) -> None:
        self.progress = input.progress or BroadcastProgress(broadcast_id=input.broadcast_id)
        self.paused = self.progress.status == "paused"

    @workflow.query
    def progress_view(self) -> BroadcastProgress:
        return self.progress

    @workflow.signal
    def pause(self, control: BroadcastControl) -> None:
        self.paused = True
        if self.progress.status in ("scheduled", "sending"):
            self.progress.status = "paused"
            self.progress.status_reason = control.reason or "paused by an operator"

    @workflow.signal
    def resume(self, control: BroadcastControl) -> None:
        self.paused = False
        if self.progress.status == "paused":
            self.progress.status = "sending" if self.progress.audience_fixed else "scheduled"
            self.progress.status_reason = None

    @workflow.run
    async def run(self, input: BroadcastInput) -> BroadcastProgress:
        try:
            if not self.progress.audience_fixed:
                await self._wait_for_start(input)
                fixed = await workflow.execute_activity_method(
                    BroadcastActivities.fix_broadcast_audience,
                    FixBroadcastAudienceInput(input.broadcast_id, workflow.now().isoformat()),
                    start_to_close_timeout=timedelta(minutes=10),
                    retry_policy=BOOKKEEPING,
                    summary="Fix the broadcast's audience (the segment's members now)",
                )
                self.progress.total = fixed.total
                self.progress.groups = fixed.groups
                self.progress.audience_fixed = True
                self.progress.tokens = float(input.burst)
                self.progress.refilled_at = workflow.now().isoformat()
                self.progress.status = "paused" if self.paused else "sending"
            batches = 0
            for group in self.progress.groups:
                while not group.done:
                    await self._release(group)
                    await self._wait_unpaused()
                    waited = await self._take_tokens(input)
                    if waited:
                        continue  # paused while waiting for tokens? look again
                    await self._send_batch(input, group)
                    batches += 1
                    if (
                        batches >= input.batches_per_run
                        or workflow.info().is_continue_as_new_suggested()
                    ):
                        await workflow.wait_condition(workflow.all_handlers_finished)
                        input.progress = self.progress
                        workflow.continue_as_new(input)
        except (asyncio.CancelledError, ActivityError) as err:
            if not is_cancelled_exception(err):
                # E.g. the segment was deleted before the send time: say so, and fail.
                reason = str(getattr(err, "cause", None) or err)[:500]
                self.progress.status, self.progress.status_reason = "failed", reason
                await self._set_status(input, "failed", reason)
                raise ApplicationError(f"broadcast {input.broadcast_id} failed: {reason}") from err
            self.progress.status = "cancelled"
            await self._set_status(input, "cancelled", "cancelled by an operator")
            raise
        self.progress.status = "completed"
        self.progress.status_reason = None
        await self._set_status(input, "completed", None)
        return self.progress

    async def _wait_for_start(self, input: BroadcastInput) -> None:
        start = workflow.now()
        if input.send_at:
            start = datetime.fromisoformat(input.send_at)
        elif input.local_time:
            # The audience is fixed when the first zone's local time comes.
            start = datetime.fromisoformat(input.local_time + "+00:00") - EARLIEST_OFFSET
        if start > workflow.now():
            if not self.paused:
                self.progress.status = "scheduled"
            await workflow.sleep(
                start - workflow.now(), summary=f"Wait until {start.isoformat()} to start sending"
            )

    async def _release(self, group: ZoneGroup) -> None:
        release = datetime.fromisoformat(group.release_at)
        if release > workflow.now():
            where = "everyone" if group.zone == "*" else f"contacts in {group.zone}"
            await workflow.sleep(
                release - workflow.now(),
                summary=f"Wait until {release.isoformat()} to send to {where}",
            )

    async def _wait_unpaused(self) -> None:
        if self.paused:
            await workflow.wait_condition(lambda: not self.paused)
            # Tokens do not pile up during a pause.
            self.progress.refilled_at = workflow.now().isoformat()

    async def _take_tokens(self, input: BroadcastInput) -> bool:
        """Refill the bucket for the time since the last batch ended; if it holds less
        than a full burst, sleep until it does (batches of ``burst`` keep the call count
        low) and say so."""
        now = workflow.now()
        last = datetime.fromisoformat(self.progress.refilled_at or now.isoformat())
        elapsed = max(0.0, (now - last).total_seconds())
        self.progress.tokens = min(
            float(input.burst), self.progress.tokens + elapsed * input.rate_per_second
        )
        self.progress.refilled_at = now.isoformat()
        if self.progress.tokens >= input.burst - 1e-9:
            return False
        missing = (input.burst - self.progress.tokens) / input.rate_per_second
        await workflow.sleep(
            timedelta(seconds=max(missing, 0.001)), summary="Wait for the send rate to allow more"
        )
        return True

    async def _send_batch(self, input: BroadcastInput, group: ZoneGroup) -> None:
        limit = max(1, math.floor(self.progress.tokens))
        for attempt in range(BATCH_ATTEMPTS):
            try:
                result = await workflow.execute_activity_method(
                    BroadcastActivities.send_broadcast_batch,
                    SendBroadcastBatchInput(
                        broadcast_id=input.broadcast_id,
                        zone=group.zone,
                        after=group.cursor,
                        limit=limit,
                        now=workflow.now().isoformat(),
                        stop_on_rejection=input.error_policy == "pause",
                    ),
                    start_to_close_timeout=timedelta(minutes=5),
                    heartbeat_timeout=timedelta(seconds=60),
                    # Never retried by Temporal: every provider call must be a granted token.
                    retry_policy=RetryPolicy(maximum_attempts=1),
                    summary=f"Send to up to {limit} recipients"
                    + ("" if group.zone == "*" else f" in {group.zone}"),
                )
            except ActivityError as err:
                if is_cancelled_exception(err):
                    raise  # the broadcast is being cancelled
                # Those sent before the error stay sent; their tokens are spent.
                self.progress.tokens = 0.0
                self.progress.refilled_at = workflow.now().isoformat()
                if attempt + 1 < BATCH_ATTEMPTS:
                    await workflow.sleep(
                        timedelta(seconds=min(60, 2**attempt)),
                        summary="Back off after a failed batch",
                    )
                    await self._wait_unpaused()
                    continue
                reason = f"sends kept failing: {err.cause or err}"
                if input.error_policy == "pause":
                    await self._pause_self(input, reason)
                else:
                    await workflow.execute_activity_method(
                        BroadcastActivities.fail_broadcast_recipients,
                        FailRecipientsInput(input.broadcast_id, group.zone, reason[:500]),
                        start_to_close_timeout=timedelta(minutes=1),
                        retry_policy=BOOKKEEPING,
                        summary="Record the contacts whose sends kept failing as failed",
                    )
                return
            self.progress.tokens = max(0.0, self.progress.tokens - result.attempted)
            # Refill counts from now: no credit for the time the batch was in flight.
            self.progress.refilled_at = workflow.now().isoformat()
            self.progress.sent, self.progress.skipped = result.sent, result.skipped
            self.progress.failed = result.failed
            group.cursor = result.last_contact_id
            group.done = result.done
            if result.rejected and input.error_policy == "pause":
                await self._pause_self(input, f"a send was refused: {result.rejected}")
            return

    async def _pause_self(self, input: BroadcastInput, reason: str) -> None:
        self.paused = True
        self.progress.status, self.progress.status_reason = "paused", reason[:500]
        await self._set_status(input, "paused", reason[:500])

    async def _set_status(self, input: BroadcastInput, status: str, reason: str | None) -> None:
        await workflow.execute_activity_method(
            BroadcastActivities.set_broadcast_status,
            SetBroadcastStatusInput(input.broadcast_id, status, reason),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=BOOKKEEPING,
            summary=f"Record the broadcast as {status}",
        )
