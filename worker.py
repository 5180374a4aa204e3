"""The Nurture worker: runs journey workflows and their activities on one task queue, and
the inbox drain that delivers events the API stored while Temporal was unreachable.

Start as many as you like, on as many hosts as you like; they share the task queue, and
their drains never claim the same event.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import py_compile
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.broadcasts import BroadcastActivities
from activities.bulk_enrollment import BulkEnrollmentActivities
from activities.contacts import ContactActivities, ContactUpdateActivities
from activities.counters import start_metrics_server
from activities.crm import CrmActivities
from activities.enrollments import EnrollmentActivities
from activities.inbox import InboxDrain
from activities.messaging import MessagingActivities
from activities.optimisation import OptimisationActivities
from activities.refresh import AudienceActivities
from activities.webhooks import WebhookActivities
from models.codec import data_converter
from settings import Settings, get_settings
from workflows.audience_refresh import AudienceRefreshWorkflow, ensure_audience_schedule
from workflows.broadcast import BroadcastWorkflow
from workflows.bulk_enroll import BulkEnrollWorkflow
from workflows.crm_sync import CrmSyncWorkflow
from workflows.journey import JourneyWorkflow

WORKFLOWS = [
    JourneyWorkflow,
    CrmSyncWorkflow,
    AudienceRefreshWorkflow,
    BulkEnrollWorkflow,  # campaigns
    BroadcastWorkflow,  # campaigns
]


def build_activities(settings: Settings, client: Client | None = None) -> list[Callable[..., Any]]:
    """Every activity the journeys call, bound to these settings.

    ``client`` lets activities start workflows (the CRM sync of a new task).
    """
    contacts = ContactActivities(settings.database_url)
    updates = ContactUpdateActivities(settings)
    messaging = MessagingActivities(settings)
    enrollments = EnrollmentActivities(settings)
    crm = CrmActivities(settings, client)
    webhooks = WebhookActivities(settings)
    audience = AudienceActivities(settings)
    optimisation = OptimisationActivities(settings)
    bulk = BulkEnrollmentActivities(settings)  # campaigns
    broadcasts = BroadcastActivities(settings, messaging)  # campaigns
    return [
        contacts.load_contact,
        updates.update_contact,
        messaging.send_email,
        messaging.send_sms,
        enrollments.finish_enrollment,
        enrollments.record_variant,
        enrollments.enroll_contact,
        crm.record_crm_action,
        crm.sync_crm_task,
        webhooks.call_webhook,
        audience.refresh_audience,
        optimisation.choose_send_time,
        optimisation.choose_channel,
        optimisation.assign_split_variant,
        bulk.fix_bulk_audience,
        bulk.enroll_bulk_page,
        bulk.finish_bulk_job,
        broadcasts.fix_broadcast_audience,
        broadcasts.send_broadcast_batch,
        broadcasts.fail_broadcast_recipients,
        broadcasts.set_broadcast_status,
    ]


PROJECT_DIR = Path(__file__).resolve().parent


def warm_bytecode() -> int:
    """Write the bytecode of the project's loaded modules where imports will find it; return
    how many files were compiled.

    The sandbox imports each workflow module afresh for every run it starts (and every
    replay after a cache eviction). With no ``.pyc`` beside the source, as under
    ``PYTHONDONTWRITEBYTECODE`` or a read-only application directory, each of those imports
    compiles the source again: measured at about two thirds of the worker's CPU per new
    journey. Where the source's ``__pycache__`` cannot be written, a private
    ``sys.pycache_prefix`` is used instead.
    """
    sources: set[Path] = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        path = Path(file).resolve()
        if path.is_relative_to(PROJECT_DIR) and not path.is_relative_to(Path(sys.prefix)):
            sources.add(path)
    compiled = 0
    for source in sorted(sources):
        cached = importlib.util.cache_from_source(str(source))
        try:
            fresh = Path(cached).stat().st_mtime >= source.stat().st_mtime
        except OSError:
            fresh = False
        if fresh:
            continue
        try:
            py_compile.compile(str(source), cfile=cached, doraise=True)
        except OSError:
            if sys.pycache_prefix is None:
                sys.pycache_prefix = tempfile.mkdtemp(prefix="nurture-pycache-")
            cached = importlib.util.cache_from_source(str(source))
            py_compile.compile(str(source), cfile=cached, doraise=True)
        compiled += 1
    return compiled


def build_worker(client: Client, settings: Settings, task_queue: str | None = None) -> Worker:
    warm_bytecode()
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(settings, client),
        graceful_shutdown_timeout=timedelta(seconds=10),
        max_cached_workflows=settings.worker_max_cached_workflows,
        max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        max_concurrent_workflow_task_polls=settings.worker_workflow_task_pollers,
        max_concurrent_activity_task_polls=settings.worker_activity_task_pollers,
        workflow_runner=SandboxedWorkflowRunner(
            # The journey's models and their heavy imports (pydantic, zoneinfo) load once per
            # process rather than once per run's sandbox.
            restrictions=SandboxRestrictions.default.with_passthrough_modules(
                "pydantic", "pydantic_core", "annotated_types", "models"
            )
        ),
    )


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    settings = get_settings()
    client = await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
    await ensure_audience_schedule(client, settings)
    if settings.worker_metrics_port is not None:
        start_metrics_server(settings.worker_metrics_port, settings.worker_metrics_host)
    worker = build_worker(client, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info(
        "worker polling task queue %s on %s", settings.task_queue, settings.temporal_address
    )
    async with worker, InboxDrain(settings, client):
        await stop.wait()
    logging.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
