"""AudienceRefreshWorkflow: started by a Temporal Schedule every ``audience_refresh_every``,
so time-based segment conditions ("no activity in 30 days") and decaying scores stay
current even when nothing happens to a contact.

``ensure_audience_schedule`` creates (or updates) the schedule; every worker calls it at
start, and the first one wins.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from temporalio.client import (
        Client,
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleAlreadyRunningError,
        ScheduleIntervalSpec,
        ScheduleOverlapPolicy,
        SchedulePolicy,
        ScheduleSpec,
        ScheduleUpdate,
        ScheduleUpdateInput,
    )

    from activities.refresh import AudienceActivities
    from models.contracts import RefreshAudienceInput, RefreshAudienceResult
    from models.durations import parse_duration
    from settings import Settings

SCHEDULE_ID = "nurture-audience-refresh"


@workflow.defn(name="AudienceRefresh")
class AudienceRefreshWorkflow:
    @workflow.run
    async def run(self, input: RefreshAudienceInput) -> RefreshAudienceResult:
        return await workflow.execute_activity_method(
            AudienceActivities.refresh_audience,
            input,
            summary="Recompute scores, lifecycle stages and segment membership",
            # A million contacts with a dozen segments is minutes of SQL, not hours.
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=10),
                maximum_interval=timedelta(minutes=5),
                maximum_attempts=5,
            ),
        )


def audience_schedule(settings: Settings) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            AudienceRefreshWorkflow.run,
            RefreshAudienceInput(),
            id=SCHEDULE_ID,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=parse_duration(settings.audience_refresh_every))]
        ),
        # One refresh at a time; a slow one delays the next rather than piling up.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_audience_schedule(client: Client, settings: Settings) -> None:
    """Create the refresh schedule, or bring its interval and task queue up to date."""
    wanted = audience_schedule(settings)
    try:
        await client.create_schedule(SCHEDULE_ID, wanted)
    except ScheduleAlreadyRunningError:

        def update(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=wanted)

        await client.get_schedule_handle(SCHEDULE_ID).update(update)
