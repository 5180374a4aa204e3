"""Bulk enrollment of a whole segment into a journey, end to end.

Loads N contacts into a scratch database, defines a segment holding all of them (through
the API: membership computed in SQL), publishes a journey whose contacts wait 30 days,
then enrolls the segment with one ``POST /v1/journeys/{key}/bulk-enrollments`` against a
real Temporal dev server (in memory) and worker processes, polls the job's progress as
a client would, and checks at the end that every contact has exactly one enrollment and
one journey workflow.

Prints the time to fix the audience, the time to enroll everyone and contacts per second.
Each enrollment is a committed row plus a started workflow whose first task runs on the
worker, so the figure is the whole journey start, not a database insert.

Usage: ``.venv/bin/python -m bench.bulk_enroll [--contacts 100000] [--workers 1]``
(default 1,000 contacts, about two minutes on the shared 2-core machine). Uses the server
``DATABASE_URL`` names (a scratch database, dropped after) or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from bench.stack import scratch_database
from models.contracts import SEARCH_ATTRIBUTES
from models.db import session_scope
from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent

LOAD_CONTACTS = """
INSERT INTO contacts (id, email, attributes, lifecycle_stage, score, score_adjustment, tags,
                      email_status, sms_status, created_at, updated_at)
SELECT gen_random_uuid(), 'c' || g || '@bench.example', '{"cohort": "bench"}'::jsonb,
       'subscriber', 0, 0, ARRAY[]::text[], 'subscribed', 'subscribed', now(), now()
FROM generate_series(1, :n) AS g
"""


def start_worker(settings: Settings, address: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": settings.database_url or "",
        "NURTURE_TEMPORAL_ADDRESS": address,
        "NURTURE_TASK_QUEUE": settings.task_queue,
        "NURTURE_DATA_DIR": str(settings.data_dir),
        "NURTURE_API_KEY": settings.api_key or "",
        "NURTURE_BULK_ENROLL_PAGE_SIZE": str(settings.bulk_enroll_page_size),
        "NURTURE_BULK_ENROLL_CONCURRENCY": str(settings.bulk_enroll_concurrency),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.subprocess_worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )


async def backlog(env: WorkflowEnvironment, settings: Settings) -> int:
    """Workflow tasks on the journeys' queue that no worker has taken yet (approximate)."""
    described = await env.client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=env.client.namespace,
            task_queue=TaskQueue(name=settings.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            report_stats=True,
        )
    )
    return int(described.stats.approximate_backlog_count)


async def run(database_url: str, contacts: int, workers: int, concurrency: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="nurture-bench-bulk-"))
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        api_key="bench-key",
        task_queue=f"bench-{uuid.uuid4().hex[:6]}",
        bulk_enroll_concurrency=concurrency,
    )
    async with session_scope(database_url) as session:
        await (await session.connection()).execute(sa.text(LOAD_CONTACTS), {"n": contacts})
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        # On disk: the in-memory dev server crashed (SIGSEGV in its SQLite) at 78,000 runs.
        dev_server_extra_args=["--db-filename", str(data_dir / "temporal.db")],
    )
    address = env.client.service_client.config.target_host
    processes = [start_worker(settings, address) for _ in range(workers)]
    report: dict[str, Any] = {"contacts": contacts, "workers": workers}
    try:
        app = create_app(settings, temporal=env.client)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://bench",
            headers={"X-API-Key": "bench-key"},
            timeout=600,
        ) as api:
            began = time.perf_counter()
            response = await api.put(
                "/v1/segments/everyone",
                json={"name": "Everyone", "condition": {"attr": "cohort", "value": "bench"}},
            )
            assert response.status_code in (200, 201), response.text
            report["segment_seconds"] = round(time.perf_counter() - began, 2)
            document = {
                "key": "bench-hold",
                "name": "Bench hold",
                "steps": [{"id": "hold", "type": "wait", "duration": "30d"}],
            }
            assert (await api.post("/v1/journeys", json=document)).status_code == 201
            assert (await api.post("/v1/journeys/bench-hold/publish")).status_code == 201
            began = time.perf_counter()
            response = await api.post(
                "/v1/journeys/bench-hold/bulk-enrollments", json={"segment": "everyone"}
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            fixed_at = None
            last_print = 0.0
            while True:
                view = (await api.get(f"/v1/bulk-enrollments/{job_id}")).json()
                now = time.perf_counter() - began
                if fixed_at is None and view["total"] is not None:
                    fixed_at = now
                if now - last_print >= 10:
                    last_print = now
                    print(
                        f"  {now:6.0f} s: {view['done']:,} of {view['total'] or '?'} done; "
                        f"{await backlog(env, settings):,} workflow tasks queued"
                    )
                if view["status"] != "running":
                    break
                await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - began
            # Every run started; now until the workers have taken every first task.
            for _ in range(7200):
                if await backlog(env, settings) == 0:
                    break
                await asyncio.sleep(0.5)
            drained = time.perf_counter() - began
        assert view["status"] == "completed", view
        report.update(
            {
                "fix_audience_seconds": round(fixed_at or 0.0, 2),
                "enroll_seconds": round(elapsed, 1),
                "contacts_per_second": round(contacts / elapsed, 1),
                "first_tasks_done_seconds": round(drained, 1),
                "enrolled": view["enrolled"],
                "failed": view["failed"],
            }
        )
        async with session_scope(database_url) as session:
            per_contact = (
                await (await session.connection()).execute(
                    sa.text(
                        "SELECT count(*), count(DISTINCT contact_id), "
                        "count(DISTINCT workflow_id) FROM enrollments"
                    )
                )
            ).one()
        report["enrollment_rows"], report["distinct_contacts"], report["workflows"] = (
            int(per_contact[0]),
            int(per_contact[1]),
            int(per_contact[2]),
        )
        assert per_contact[0] == per_contact[1] == per_contact[2] == contacts, per_contact
        # And on Temporal's side: one journey run per contact (the dev server's visibility).
        runs = await env.client.count_workflows("WorkflowType = 'JourneyWorkflow'")
        report["temporal_journey_runs"] = runs.count
        assert runs.count == contacts, runs
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        await env.shutdown()
    return report


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=Settings.model_fields["bulk_enroll_concurrency"].default,
        help="journeys started at once",
    )
    args = parser.parse_args()
    async with scratch_database() as database_url:
        report = await run(database_url, args.contacts, args.workers, args.concurrency)
    print(
        f"\n{report['contacts']:,} contacts, {report['workers']} worker(s): segment defined in "
        f"{report['segment_seconds']} s; audience fixed after {report['fix_audience_seconds']} "
        f"s; all enrolled in {report['enroll_seconds']} s = {report['contacts_per_second']} "
        f"contacts/s, every first workflow task done after "
        f"{report['first_tasks_done_seconds']} s; {report['enrollment_rows']:,} enrollments for "
        f"{report['distinct_contacts']:,} contacts, {report['workflows']:,} workflow ids, "
        f"{report['temporal_journey_runs']:,} journey runs on Temporal"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bulk_enroll_{args.contacts}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
