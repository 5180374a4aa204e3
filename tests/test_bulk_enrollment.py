"""Bulk enrollment: a list or a segment into a journey in one call, its progress, cancel,
recurring schedules (dev server), enroll_on_publish, and a worker SIGKILLed mid-job
(each contact still enrolled exactly once)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, func, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.enrollments import current_version, new_enrollment_values
from models.campaigns import BulkEnrollInput
from models.contracts import journey_workflow_id
from models.db import session_scope
from models.tables import BulkEnrollmentItem, BulkEnrollmentJob, Contact, Enrollment, Journey
from settings import Settings
from tests.helpers import publish, unique
from tests.test_segments import put_segment
from worker import build_worker
from workflows.bulk_enroll import BulkEnrollWorkflow

ROOT = Path(__file__).resolve().parent.parent
HOLD = [{"id": "hold", "type": "wait", "duration": "30d"}]


def worker_for(env: WorkflowEnvironment, settings: Settings) -> Worker:
    return build_worker(env.client, settings)


async def hold_journey(api: httpx.AsyncClient, **top: Any) -> str:
    """A published journey whose contacts sit in a 30-day wait (they stay enrolled)."""
    key = str(top.pop("key", None) or unique("bulk"))
    await publish(api, {"key": key, "name": key, "steps": HOLD, **top})
    return key


async def import_contacts(
    api: httpx.AsyncClient, settings: Settings, count: int, **attributes: Any
) -> list[str]:
    """``count`` new contacts in one import; their ids, in email order."""
    emails = sorted(f"{unique('bulk')}@example.com" for _ in range(count))
    response = await api.post(
        "/v1/contacts/import", json=[{"email": e, "attributes": attributes} for e in emails]
    )
    assert response.status_code < 300, response.text
    async with session_scope(settings.database_url) as session:
        rows = (
            await session.exec(
                select(Contact.email, Contact.id).where(col(Contact.email).in_(emails))
            )
        ).all()
    by_email = dict(rows)
    return [str(by_email[e]) for e in emails]


async def wait_for_job(
    api: httpx.AsyncClient, job_id: str, status: str = "completed", seconds: float = 90
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        response = await api.get(f"/v1/bulk-enrollments/{job_id}")
        assert response.status_code == 200, response.text
        if response.json()["status"] == status:
            return dict(response.json())
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job never became {status}: {response.text}")
        await asyncio.sleep(0.2)


async def enrollment_counts(settings: Settings, journey_key: str) -> dict[str, int]:
    """Enrollment rows per contact in a journey."""
    async with session_scope(settings.database_url) as session:
        journey = (await session.exec(select(Journey).where(Journey.key == journey_key))).one()
        rows = (
            await session.exec(
                select(Enrollment.contact_id, func.count())
                .where(Enrollment.journey_id == journey.id)
                .group_by(col(Enrollment.contact_id))
            )
        ).all()
    return {str(contact_id): count for contact_id, count in rows}


async def row_count(settings: Settings, table: Any) -> int:
    async with session_scope(settings.database_url) as session:
        return int((await session.exec(select(func.count()).select_from(table))).one())


async def test_bulk_enrollment_of_a_list_enrolls_each_contact_once_with_progress(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.bulk_enroll_page_size = 7  # several pages (keyset) for 30 contacts
    key = await hold_journey(dev_api)
    ids = await import_contacts(dev_api, settings, 30)
    async with worker_for(dev_env, settings):
        response = await dev_api.post(
            f"/v1/journeys/{key}/bulk-enrollments", json={"contact_ids": [*ids, ids[0]]}
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "running" and job["total"] == 30 and job["source"] == "list"
        done = await wait_for_job(dev_api, job["id"])
        assert (done["enrolled"], done["already_enrolled"], done["done"]) == (30, 0, 30)
        assert done["failed"] == 0 and done["skipped"] == 0 and done["live"] is None
        # The same list again: nobody enrolled twice, each counted as already enrolled.
        again = await dev_api.post(f"/v1/journeys/{key}/bulk-enrollments", json={"emails": []})
        assert again.status_code == 422
        second = await dev_api.post(
            f"/v1/journeys/{key}/bulk-enrollments", json={"contact_ids": ids}
        )
        redone = await wait_for_job(dev_api, second.json()["id"])
        assert (redone["enrolled"], redone["already_enrolled"]) == (0, 30)
    assert await enrollment_counts(settings, key) == dict.fromkeys(ids, 1)
    result = await dev_env.client.get_workflow_handle(job["workflow_id"]).result()
    assert result["enrolled"] == 30 and result["pages"] >= 5
    listed = await dev_api.get("/v1/bulk-enrollments", params={"journey": key})
    assert [j["id"] for j in listed.json()] == [second.json()["id"], job["id"]]


async def test_bulk_enrollment_of_a_segment_takes_its_members_at_start(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    cohort = unique("cohort")
    segment = unique("seg")
    members = await import_contacts(dev_api, settings, 12, cohort=cohort)
    outsider = await import_contacts(dev_api, settings, 1, cohort="other")
    await put_segment(dev_api, segment, {"attr": "cohort", "op": "eq", "value": cohort})
    key = await hold_journey(dev_api)
    async with worker_for(dev_env, settings):
        response = await dev_api.post(
            f"/v1/journeys/{key}/bulk-enrollments", json={"segment": segment}
        )
        assert response.status_code == 202, response.text
        done = await wait_for_job(dev_api, response.json()["id"])
    assert done["total"] == 12 and done["enrolled"] == 12 and done["segment"] == segment
    enrolled = await enrollment_counts(settings, key)
    assert enrolled == dict.fromkeys(members, 1) and outsider[0] not in enrolled
    async with session_scope(settings.database_url) as session:
        ledger = (
            await session.exec(
                select(BulkEnrollmentItem).where(BulkEnrollmentItem.job_id == uuid.UUID(done["id"]))
            )
        ).all()
    assert {str(i.contact_id) for i in ledger} == set(members)
    assert {i.outcome for i in ledger} == {"enrolled"} and all(i.enrollment_id for i in ledger)


async def test_bulk_enrollment_progress_is_queryable_and_cancel_keeps_those_enrolled(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.bulk_enroll_page_size = 5
    settings.bulk_enroll_concurrency = 1
    key = await hold_journey(dev_api)
    ids = await import_contacts(dev_api, settings, 150)
    async with worker_for(dev_env, settings):
        job = (
            await dev_api.post(f"/v1/journeys/{key}/bulk-enrollments", json={"contact_ids": ids})
        ).json()
        while True:
            view = (await dev_api.get(f"/v1/bulk-enrollments/{job['id']}")).json()
            if view["done"] >= 15 and view["live"] is not None and view["live"]["pages"] >= 2:
                break
            await asyncio.sleep(0.05)
        assert view["status"] == "running" and view["total"] == 150
        assert 0 < view["live"]["enrolled"] <= view["done"] < 150
        cancelled = await dev_api.post(f"/v1/bulk-enrollments/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        handle = dev_env.client.get_workflow_handle(job["workflow_id"])
        for _ in range(100):
            if (await handle.describe()).status == WorkflowExecutionStatus.CANCELED:
                break
            await asyncio.sleep(0.1)
        if (await handle.describe()).status != WorkflowExecutionStatus.CANCELED:
            await handle.result()
        again = await dev_api.post(f"/v1/bulk-enrollments/{job['id']}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
        # A contact whose enrollment was under way when the page was cancelled finishes
        # and is recorded (shielded) a moment after the workflow ends: the counts settle.
        for _ in range(50):
            final = (await dev_api.get(f"/v1/bulk-enrollments/{job['id']}")).json()
            enrolled = await enrollment_counts(settings, key)
            if final["enrolled"] == len(enrolled):
                break
            await asyncio.sleep(0.1)
    assert final["status"] == "cancelled" and final["enrolled"] == len(enrolled) < 150
    assert set(enrolled.values()) == {1}
    async with session_scope(settings.database_url) as session:
        still = (
            await session.exec(
                select(func.count())
                .select_from(Enrollment)
                .where(col(Enrollment.contact_id).in_([uuid.UUID(c) for c in enrolled]))
                .where(Enrollment.status == "active")
            )
        ).one()
    assert still == len(enrolled)  # those enrolled stay enrolled


async def test_bulk_enrollment_refuses_bad_input_and_stores_nothing(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    key = await hold_journey(dev_api)
    [known] = await import_contacts(dev_api, settings, 1)
    draft = unique("draft")
    assert (
        await dev_api.post("/v1/journeys", json={"key": draft, "name": "d", "steps": HOLD})
    ).status_code == 201
    jobs_before = await row_count(settings, BulkEnrollmentJob)
    items_before = await row_count(settings, BulkEnrollmentItem)
    url = f"/v1/journeys/{key}/bulk-enrollments"
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (url, {}, 422, "exactly one of contact_ids, emails, segment"),
        (url, {"contact_ids": [known], "segment": "x"}, 422, "exactly one of"),
        (url, {"contact_ids": []}, 422, "contact_ids"),
        (url, {"contact_ids": ["not-a-uuid"]}, 422, "contact_ids"),
        (url, {"contact_ids": [known, str(uuid.uuid4())]}, 422, "contact_ids: 1 unknown"),
        (url, {"emails": ["nobody-here@example.com"]}, 422, "emails: 1 unknown"),
        (url, {"emails": ["not an email"]}, 422, "invalid email address"),
        (url, {"segment": "no-such-segment"}, 422, "segment: no segment 'no-such-segment'"),
        (url, {"segment": "Bad Key"}, 422, "segment"),
        (url, {"contact_ids": [known], "extra": 1}, 422, "extra"),
        ("/v1/journeys/no-such-journey/bulk-enrollments", {"contact_ids": [known]}, 404, "no"),
        (f"/v1/journeys/{draft}/bulk-enrollments", {"contact_ids": [known]}, 409, "draft"),
    ]
    for path, body, code, words in cases:
        response = await dev_api.post(path, json=body)
        assert response.status_code == code, (body, response.text)
        assert words in response.text, (body, response.text)
    missing = await dev_api.get(f"/v1/bulk-enrollments/{uuid.uuid4()}")
    assert missing.status_code == 404 and "no bulk enrollment" in missing.text
    assert (await dev_api.get("/v1/bulk-enrollments/nope")).status_code == 422
    assert (await dev_api.post(f"/v1/bulk-enrollments/{uuid.uuid4()}/cancel")).status_code == 404
    assert (await dev_api.get("/v1/bulk-enrollments", params={"limit": 0})).status_code == 422
    assert await row_count(settings, BulkEnrollmentJob) == jobs_before
    assert await row_count(settings, BulkEnrollmentItem) == items_before
    assert await enrollment_counts(settings, key) == {}


async def test_enroll_on_publish_enrolls_the_trigger_segments_members(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    cohort, segment = unique("cohort"), unique("seg")
    members = await import_contacts(dev_api, settings, 6, cohort=cohort)
    await put_segment(dev_api, segment, {"attr": "cohort", "op": "eq", "value": cohort})
    key = unique("onpub")
    document = {
        "key": key,
        "name": key,
        "trigger": {"segment": segment},
        "enroll_on_publish": True,
        "steps": HOLD,
    }
    async with worker_for(dev_env, settings):
        assert (await dev_api.post("/v1/journeys", json=document)).status_code == 201
        published = await dev_api.post(f"/v1/journeys/{key}/publish")
        assert published.status_code == 201, published.text
        job_id = published.json()["bulk_enrollment_id"]
        assert job_id
        done = await wait_for_job(dev_api, job_id)
    assert done["enrolled"] == 6 and done["journey"] == key
    assert await enrollment_counts(settings, key) == dict.fromkeys(members, 1)


async def test_recurring_enrollment_schedule_is_created_updated_run_and_deleted(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    cohort, segment = unique("cohort"), unique("seg")
    members = await import_contacts(dev_api, settings, 4, cohort=cohort)
    await put_segment(dev_api, segment, {"attr": "cohort", "op": "eq", "value": cohort})
    key = await hold_journey(dev_api)
    url = f"/v1/journeys/{key}/enrollment-schedules"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"segment": segment, "cron": "0 9 * * MON", "timezone": "Mars/Base"}, "timezone"),
        ({"segment": segment, "cron": "every monday"}, "cron"),
        ({"segment": segment, "cron": "99 99 * * *"}, "cron"),
        ({"segment": "no-such-seg", "cron": "0 9 * * MON"}, "segment"),
        ({"cron": "0 9 * * MON"}, "segment"),
    ]
    for body, field in bad:
        response = await dev_api.post(url, json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in response.text, (body, response.text)
    assert (await dev_api.get("/v1/enrollment-schedules")).json() == []
    async with worker_for(dev_env, settings):
        created = await dev_api.post(
            url, json={"segment": segment, "cron": "0 9 * * MON", "timezone": "Europe/Paris"}
        )
        assert created.status_code == 201, created.text
        schedule = created.json()
        # Every Monday 09:00 in Paris: 07:00 or 08:00 UTC depending on DST.
        assert schedule["next_runs"]
        for moment in schedule["next_runs"]:
            when = datetime.fromisoformat(moment)
            assert when.weekday() == 0 and when.hour in (7, 8) and when.minute == 0
        handle = dev_env.client.get_schedule_handle(schedule["schedule_id"])
        described = await handle.describe()
        assert described.schedule.spec.cron_expressions == ["0 9 * * MON"] or (
            described.schedule.spec.calendars
        )
        assert described.schedule.spec.time_zone_name == "Europe/Paris"
        bad_update = await dev_api.patch(
            f"/v1/enrollment-schedules/{schedule['id']}", json={"timezone": "Nowhere/Land"}
        )
        assert bad_update.status_code == 422 and "timezone" in bad_update.text
        updated = await dev_api.patch(
            f"/v1/enrollment-schedules/{schedule['id']}",
            json={"cron": "30 18 * * FRI", "timezone": "America/New_York"},
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["cron"] == "30 18 * * FRI"
        described = await handle.describe()
        assert described.schedule.spec.time_zone_name == "America/New_York"
        # Run it now rather than wait for Friday: the scheduled action enrolls the segment.
        await handle.trigger()
        job = None
        for _ in range(300):
            listed = (await dev_api.get("/v1/bulk-enrollments", params={"journey": key})).json()
            if listed and listed[0]["status"] == "completed":
                job = listed[0]
                break
            await asyncio.sleep(0.1)
        assert job is not None, "the scheduled run never completed"
        assert job["schedule_id"] == schedule["id"] and job["enrolled"] == 4
        assert await enrollment_counts(settings, key) == dict.fromkeys(members, 1)
        got = await dev_api.get(f"/v1/enrollment-schedules/{schedule['id']}")
        assert got.status_code == 200 and got.json()["timezone"] == "America/New_York"
        deleted = await dev_api.delete(f"/v1/enrollment-schedules/{schedule['id']}")
        assert deleted.status_code == 204
    with pytest.raises(RPCError):
        await handle.describe()
    assert (await dev_api.get(f"/v1/enrollment-schedules/{schedule['id']}")).status_code == 404
    assert (await dev_api.delete(f"/v1/enrollment-schedules/{uuid.uuid4()}")).status_code == 404


def _worker_process(settings: Settings, address: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": settings.database_url or "",
        "NURTURE_TEMPORAL_ADDRESS": address,
        "NURTURE_TASK_QUEUE": settings.task_queue,
        "NURTURE_DATA_DIR": str(settings.data_dir),
        "NURTURE_API_KEY": "test-api-key",
        "NURTURE_BULK_ENROLL_PAGE_SIZE": str(settings.bulk_enroll_page_size),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.subprocess_worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_bulk_enrollment_survives_a_sigkilled_worker_enrolling_each_contact_once(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.bulk_enroll_page_size = 25
    key = await hold_journey(dev_api)
    ids = await import_contacts(dev_api, settings, 400)
    address = dev_env.client.service_client.config.target_host
    first = _worker_process(settings, address)
    second = None
    try:
        job = (
            await dev_api.post(f"/v1/journeys/{key}/bulk-enrollments", json={"contact_ids": ids})
        ).json()
        while (await dev_api.get(f"/v1/bulk-enrollments/{job['id']}")).json()["done"] < 60:
            assert first.poll() is None, "the worker died on its own"
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        at_kill = (await dev_api.get(f"/v1/bulk-enrollments/{job['id']}")).json()
        assert at_kill["status"] == "running" and at_kill["done"] < 400
        second = _worker_process(settings, address)
        done = await wait_for_job(dev_api, job["id"], seconds=180)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert done["done"] == 400 and done["enrolled"] == 400 and done["failed"] == 0
    counts = await enrollment_counts(settings, key)
    assert counts == dict.fromkeys(ids, 1)
    # One journey workflow per contact, each running.
    for contact_id in ids[::40]:
        handle = dev_env.client.get_workflow_handle(journey_workflow_id(key, contact_id))
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING


async def test_bulk_enrollment_continues_as_new_carrying_its_progress(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    cohort, segment = unique("cohort"), unique("seg")
    members = await import_contacts(dev_api, settings, 9, cohort=cohort)
    await put_segment(dev_api, segment, {"attr": "cohort", "op": "eq", "value": cohort})
    key = await hold_journey(dev_api)
    workflow_id = f"bulk-enroll/test-{uuid.uuid4()}"
    async with worker_for(dev_env, settings):
        # Started as a schedule would: no job id, the workflow makes its own job.
        handle = await dev_env.client.start_workflow(
            BulkEnrollWorkflow.run,
            BulkEnrollInput(journey_key=key, segment_key=segment, page_size=2, pages_per_run=2),
            id=workflow_id,
            task_queue=settings.task_queue,
        )
        first_run = handle.first_execution_run_id
        result = await handle.result()
    assert result.status == "completed" and result.enrolled == 9 and result.total == 9
    assert result.pages == 5  # 2 + 2 + 1 pages over three runs
    first = dev_env.client.get_workflow_handle(workflow_id, run_id=first_run)
    assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    async with session_scope(settings.database_url) as session:
        job = (
            await session.exec(
                select(BulkEnrollmentJob).where(BulkEnrollmentJob.workflow_id == workflow_id)
            )
        ).one()
    assert str(job.id) == result.job_id and job.status == "completed" and job.enrolled == 9
    assert await enrollment_counts(settings, key) == dict.fromkeys(members, 1)


async def test_bulk_enrollment_chunk_counts_enrolled_already_erased_and_finishes_unstarted(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    """One chunk holding every case the enrollment core knows: new contacts, contacts
    already in the journey, an erased contact, and an enrollment row whose run never
    started (its start is finished, not duplicated)."""
    settings.bulk_enroll_page_size = 50
    settings.bulk_enroll_concurrency = 4  # chunks of 16: the 12 contacts share one
    key = await hold_journey(dev_api)
    ids = await import_contacts(dev_api, settings, 12)
    before, erased, unstarted, fresh = ids[:3], ids[3], ids[4], ids[5:]
    for contact_id in before:
        response = await dev_api.post(
            f"/v1/journeys/{key}/enrollments", json={"contact_id": contact_id}
        )
        assert response.status_code == 201, response.text
    # A row stored by an enrollment whose process died before starting the run.
    async with session_scope(settings.database_url) as session:
        journey = (await session.exec(select(Journey).where(Journey.key == key))).one()
        version = await current_version(session, journey)
        session.add(Enrollment(**new_enrollment_values(journey, version, uuid.UUID(unstarted))))
    response = await dev_api.post(f"/v1/journeys/{key}/bulk-enrollments", json={"contact_ids": ids})
    assert response.status_code == 202, response.text
    # Erased after the job was accepted, before any worker took it.
    assert (await dev_api.delete(f"/v1/contacts/{erased}")).status_code == 200
    async with worker_for(dev_env, settings):
        done = await wait_for_job(dev_api, response.json()["id"])
        assert (done["enrolled"], done["already_enrolled"], done["skipped"]) == (7, 4, 1)
        assert done["failed"] == 0 and done["done"] == 12
        described = await dev_env.client.get_workflow_handle(
            journey_workflow_id(key, unstarted, "")
        ).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
    counts = await enrollment_counts(settings, key)
    assert counts == {c: 1 for c in [*before, unstarted, *fresh]}
    async with session_scope(settings.database_url) as session:
        rows = (
            await session.exec(
                select(Enrollment.contact_id, Enrollment.run_id, Enrollment.trigger).where(
                    Enrollment.journey_id == journey.id
                )
            )
        ).all()
        ledger = (
            await session.exec(
                select(BulkEnrollmentItem.contact_id, BulkEnrollmentItem.outcome).where(
                    BulkEnrollmentItem.job_id == uuid.UUID(response.json()["id"])
                )
            )
        ).all()
    assert all(run_id for _, run_id, _ in rows)  # every run started and recorded
    job_trigger = {"bulk_enrollment": response.json()["id"]}
    assert {str(c) for c, _, t in rows if t == job_trigger} == set(fresh)
    outcomes = {str(c): o for c, o in ledger}
    assert outcomes[erased] == "skipped" and outcomes[unstarted] == "already_enrolled"
    assert {outcomes[c] for c in before} == {"already_enrolled"}
    assert {outcomes[c] for c in fresh} == {"enrolled"}


async def test_bulk_enrollment_waits_while_the_task_queue_has_a_backlog(
    dev_env: WorkflowEnvironment, settings: Settings
) -> None:
    """A page starts its next chunk only once the workers have taken all but
    ``bulk_enroll_max_backlog`` of the queued workflow tasks."""
    from temporalio.testing import ActivityEnvironment

    from activities.bulk_enrollment import BulkEnrollmentActivities
    from bench.minimal import END, MinimalInput, MinimalJourneyWorkflow, minimal_act

    settings.task_queue = f"paced-{uuid.uuid4().hex[:8]}"
    settings.bulk_enroll_max_backlog = 3
    for i in range(12):  # first tasks nobody takes yet
        await dev_env.client.start_workflow(
            MinimalJourneyWorkflow.run,
            MinimalInput([END]),
            id=f"{settings.task_queue}-{i}",
            task_queue=settings.task_queue,
        )
    beats: list[Any] = []
    env = ActivityEnvironment(client=dev_env.client)
    env.on_heartbeat = lambda *details: beats.append(details)
    paced = BulkEnrollmentActivities(settings)
    waiting = asyncio.ensure_future(env.run(paced._at_workers_pace, "resume-here"))
    await asyncio.sleep(2)
    assert not waiting.done()  # 12 queued > 3
    assert beats and beats[-1] == ("resume-here",)  # heartbeats keep the resume point
    async with Worker(
        dev_env.client,
        task_queue=settings.task_queue,
        workflows=[MinimalJourneyWorkflow],
        activities=[minimal_act],
    ):
        await asyncio.wait_for(waiting, 60)  # the worker took them: the page goes on
    settings.bulk_enroll_max_backlog = 0
    await env.run(paced._at_workers_pace, None)  # 0: unpaced, returns at once
