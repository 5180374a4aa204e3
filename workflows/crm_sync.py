"""``CrmSyncWorkflow``: push one crm_tasks row to the configured CRM, retrying for days.

Started by ``record_crm_action`` with id ``crm-sync-<task id>``. A CRM that is down or
rate-limiting is retried with backoff (10 s, doubling, at most 10 min apart) for up to
three days; a permanent refusal (bad token, 4xx, a target the SSRF guard refuses) stops
at once. Either way the row keeps the last error, and this workflow's result says how
it ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.crm import (
        CRM_SYNC_WORKFLOW,
        CrmActivities,
        CrmSyncInput,
        SyncCrmTaskInput,
    )

SYNC_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=10),
    backoff_coefficient=2,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,  # unlimited, bounded by the schedule-to-close timeout
)


@dataclass
class CrmSyncResult:
    synced: bool
    status: str  # synced | already synced | skipped | failed
    external_id: str | None = None
    error: str | None = None


@workflow.defn(name=CRM_SYNC_WORKFLOW)
class CrmSyncWorkflow:
    @workflow.run
    async def run(self, input: CrmSyncInput) -> CrmSyncResult:
        try:
            result = await workflow.execute_activity_method(
                CrmActivities.sync_crm_task,
                SyncCrmTaskInput(input.task_id),
                start_to_close_timeout=timedelta(minutes=1),
                schedule_to_close_timeout=timedelta(days=3),
                retry_policy=SYNC_RETRY,
                summary=f"Sync CRM task {input.task_id}",
            )
        except ActivityError as err:
            return CrmSyncResult(False, "failed", error=str(err.cause or err))
        return CrmSyncResult(
            result.status in ("synced", "already synced"),
            result.status,
            result.external_id,
            result.reason,
        )
