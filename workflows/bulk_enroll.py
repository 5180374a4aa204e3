"""BulkEnrollWorkflow: enroll a list or a segment's members into a journey.

One run per job (``bulk-enroll/<job id>``, or a Temporal Schedule's run for a recurring
enrollment). It fixes the audience in the job's ledger, then enrolls it page by page
(keyset on contact id), each page one activity that starts journeys with bounded
concurrency and heartbeats its resume point. Progress: the ``progress`` query, and the
counts the activities keep on the job row. Cancelling the workflow stops it after the
contacts already under way; whoever was enrolled stays enrolled. Large audiences
continue-as-new every ``pages_per_run`` pages, carrying the progress.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.bulk_enrollment import BulkEnrollmentActivities
    from models.campaigns import (
        BulkEnrollInput,
        BulkProgress,
        EnrollPageInput,
        FinishBulkJobInput,
        FixBulkAudienceInput,
    )

# Temporal or PostgreSQL down for a while: keep trying (the page resumes where it was).
PAGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)


@workflow.defn(name="BulkEnroll")
class BulkEnrollWorkflow:
    @workflow.init
    def __init__(self, input: BulkEnrollInput) -> None:
        self.progress = input.progress or BulkProgress()

    @workflow.query
    def progress_view(self) -> BulkProgress:
        return self.progress

    @workflow.run
    async def run(self, input: BulkEnrollInput) -> BulkProgress:
        if not self.progress.job_id:
            # A scheduled run makes its own job; workflow.uuid4 replays to the same id.
            self.progress.job_id = input.job_id or str(workflow.uuid4())
        job_id = self.progress.job_id
        try:
            if self.progress.total is None:
                fixed = await workflow.execute_activity_method(
                    BulkEnrollmentActivities.fix_bulk_audience,
                    FixBulkAudienceInput(
                        job_id=job_id,
                        workflow_id=workflow.info().workflow_id,
                        journey_key=input.journey_key,
                        segment_key=input.segment_key,
                        schedule_id=input.schedule_id,
                    ),
                    start_to_close_timeout=timedelta(minutes=10),
                    retry_policy=PAGE_RETRY,
                    summary=f"Fix the audience of bulk enrollment {job_id}",
                )
                self.progress.total = fixed.total
            pages = 0
            while True:
                page = await workflow.execute_activity_method(
                    BulkEnrollmentActivities.enroll_bulk_page,
                    EnrollPageInput(
                        job_id=job_id,
                        after=self.progress.cursor,
                        page_size=input.page_size,
                        concurrency=input.concurrency,
                    ),
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=timedelta(seconds=10),
                    retry_policy=PAGE_RETRY,
                    summary=f"Enroll up to {input.page_size} contacts into "
                    f"'{input.journey_key}' after {self.progress.cursor or 'the start'}",
                )
                pages += 1
                done_pages = self.progress.pages + 1
                self.progress = page.progress
                self.progress.job_id = job_id
                self.progress.cursor = page.last_contact_id
                self.progress.pages = done_pages
                if page.done:
                    break
                if pages >= input.pages_per_run or workflow.info().is_continue_as_new_suggested():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    input.progress = self.progress
                    workflow.continue_as_new(input)
        except (asyncio.CancelledError, ActivityError) as err:
            # A cancel while a page runs arrives as that activity's cancellation.
            if is_cancelled_exception(err):
                self.progress = await self._finish(job_id, "cancelled", None)
                raise
            assert isinstance(err, ActivityError)
            reason = str(err.cause or err)
            self.progress = await self._finish(job_id, "failed", reason)
            raise ApplicationError(f"bulk enrollment {job_id} failed: {reason}") from err
        self.progress = await self._finish(job_id, "completed", None)
        return self.progress

    async def _finish(self, job_id: str, status: str, error: str | None) -> BulkProgress:
        final = await workflow.execute_activity_method(
            BulkEnrollmentActivities.finish_bulk_job,
            FinishBulkJobInput(job_id=job_id, status=status, error=error),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            summary=f"Record bulk enrollment {job_id} as {status}",
        )
        final.cursor = self.progress.cursor
        final.pages = self.progress.pages
        return final
