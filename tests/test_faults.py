"""Faults injected into a running stack: worker processes SIGKILLed mid-send and mid-journey,
Temporal and PostgreSQL restarted mid-run, provider 500/429 storms. Every journey finishes,
no message is sent twice, no event is lost; each test prints its books (``pytest -s``).

Workers are real ``python worker.py`` processes (soak/stack.py), the provider is the real
SendGrid SDK against a local server that books every message it accepts.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from devstack.postgres import create_database, migrate, start_embedded, stop_embedded
from settings import Settings
from soak.stack import (
    Books,
    FakeSendGrid,
    TemporalServer,
    WorkerProcess,
    read_books,
    worker_env,
)
from tests.helpers import contact, enroll, publish, put_template, unique
from tests.test_inbox import api_client
from tests.test_journey_language import enrollments_of, journey
from tests.test_journey_workflow import messages_of, result_of
from tests.test_providers import FakeProvider, accepted, sendgrid_error, through_sendgrid
from worker import build_worker

# Each journey: an email, a pause, another email.
MESSAGES_PER_JOURNEY = 2


@dataclass
class Stack:
    settings: Settings
    temporal: TemporalServer
    provider: FakeSendGrid
    log_dir: Path
    client: Client | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    async def worker(self, name: str) -> WorkerProcess:
        env = worker_env(self.settings, self.temporal.address, self.provider.url)
        process = WorkerProcess(name, env, self.log_dir)
        self.workers.append(process)
        return await process.start()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in self.workers)


@pytest.fixture
async def stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    built = Stack(settings, TemporalServer(tmp_path / "temporal.db"), FakeSendGrid(), tmp_path)
    built.client = await built.temporal.start()
    yield built
    for process in built.workers:
        process.kill()
    built.provider.close()
    await built.temporal.stop()


async def start_journeys(api: httpx.AsyncClient, count: int) -> str:
    """``count`` contacts enrolled in a journey of two emails two seconds apart; its key."""
    template = unique("tpl")
    await put_template(api, template)
    key = unique("faults")
    await publish(
        api,
        {
            "key": key,
            "name": "Two emails",
            "steps": [
                {"id": "first", "type": "email", "template": template},
                {"id": "pause", "type": "wait", "duration": "2s"},
                {"id": "second", "type": "email", "template": template},
            ],
        },
    )
    people = await asyncio.gather(*(contact(api) for _ in range(count)))
    for person in people:
        await enroll(api, key, person["id"])
    return key


async def until(check: object, what: str, stack: Stack, seconds: float = 90) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} within {seconds}s\n{stack.logs()}")
        await asyncio.sleep(0.2)


async def all_finished(stack: Stack, key: str, count: int, seconds: float = 90) -> Books:
    async def finished() -> bool:
        rows = await enrollments_of(stack.settings, key)
        return len(rows) == count and all(r.status != "active" for r in rows)

    await until(finished, f"the {count} journeys did not finish", stack, seconds)
    books = await read_books(stack.settings, stack.provider, [key], MESSAGES_PER_JOURNEY)
    print(f"\nbooks: {books.summary()}")
    assert books.problems() == [], books.problems()
    assert books.by_status == {"completed": count}
    assert books.messages == count * MESSAGES_PER_JOURNEY
    return books


async def test_worker_killed_mid_send_another_finishes_every_journey_sending_nothing_twice(
    stack: Stack,
) -> None:
    assert stack.client is not None
    first = await stack.worker("first")
    stack.provider.hold()
    async with api_client(stack.settings, stack.client) as api:
        key = await start_journeys(api, 6)
        await until(lambda: _true(stack.provider.in_flight >= 3), "no sends in flight", stack)
        in_flight = stack.provider.in_flight
        first.kill()
        # The provider takes what it had received; the dead worker never hears it.
        stack.provider.release()
        print(f"\nSIGKILL worker with {in_flight} sends in flight at the provider")
        await stack.worker("second")
        books = await all_finished(stack, key, 6)
    # A send cut off after the provider was called may have gone: it is recorded as
    # unconfirmed and never handed over again. Nothing was accepted twice.
    assert books.messages_by_status["unconfirmed"] >= in_flight
    assert books.messages_by_status["sent"] + books.messages_by_status["unconfirmed"] == 12
    accepted_unconfirmed = books.accepted_by_provider - books.messages_by_status["sent"]
    assert in_flight <= accepted_unconfirmed <= books.messages_by_status["unconfirmed"]


async def test_two_workers_share_the_queue_and_one_killed_mid_journey_loses_nothing(
    stack: Stack,
) -> None:
    assert stack.client is not None
    doomed = await stack.worker("doomed")
    await stack.worker("survivor")
    async with api_client(stack.settings, stack.client) as api:
        key = await start_journeys(api, 10)
        await until(lambda: _true(sum(stack.provider.accepted.values()) >= 5), "no sends", stack)
        doomed.kill()
        print(f"\nSIGKILL one of two workers after {sum(stack.provider.accepted.values())} sends")
        books = await all_finished(stack, key, 10)
    assert books.messages_by_status["sent"] + books.messages_by_status["unconfirmed"] == 20


async def test_temporal_restarted_mid_run_every_journey_finishes_and_events_arrive(
    stack: Stack,
) -> None:
    assert stack.client is not None
    await stack.worker("one")
    await stack.worker("two")
    async with api_client(stack.settings, stack.client) as api:
        key = await start_journeys(api, 8)
        await until(lambda: _true(sum(stack.provider.accepted.values()) >= 3), "no sends", stack)
        await stack.temporal.stop()
        rows = await enrollments_of(stack.settings, key)
        # Events sent while Temporal is down are stored and acknowledged.
        for row in rows:
            response = await api.post(
                "/v1/events",
                json={"contact_id": str(row.contact_id), "name": "page_viewed", "id": unique("e")},
            )
            assert response.status_code == 202, response.text
        await asyncio.sleep(2)
        await stack.temporal.start()
        print("\nTemporal dev server stopped for ~3 s and started again (same port, same db)")
        books = await all_finished(stack, key, 8)
        # The workers' inbox drains delivered what the API stored meanwhile.
        await until(
            lambda: _undelivered(stack, key, 0), "events still undelivered", stack, seconds=60
        )
    assert books.events_stored >= 8


async def test_postgres_restarted_mid_run_every_journey_finishes_sending_nothing_twice(
    stack: Stack,
) -> None:
    assert stack.client is not None
    # Not under pytest's temporary directory: a pytest starting meanwhile tightens its
    # permissions, and the embedded server runs as its own user.
    pg_root = Path(tempfile.mkdtemp(prefix="nurture-faults-pg-"))
    data_dir = pg_root / "data"
    server_url = start_embedded(data_dir)
    try:
        database_url = create_database(server_url, f"nurture_faults_{uuid.uuid4().hex[:8]}")
        migrate(database_url)
        stack.settings = stack.settings.model_copy(update={"database_url": database_url})
        await stack.worker("one")
        await stack.worker("two")
        async with api_client(stack.settings, stack.client) as api:
            key = await start_journeys(api, 8)
            await until(
                lambda: _true(sum(stack.provider.accepted.values()) >= 3), "no sends", stack
            )
            stop_embedded(data_dir)
            await asyncio.sleep(2)
            assert start_embedded(data_dir) == server_url
            print("\nPostgreSQL stopped for ~2 s and started again")
            books = await all_finished(stack, key, 8)
        assert books.messages_by_status["sent"] + books.messages_by_status["unconfirmed"] == 16
    finally:
        for process in stack.workers:
            process.kill()
        stop_embedded(data_dir)
        shutil.rmtree(pg_root, ignore_errors=True)


async def test_provider_500_and_429_storm_each_message_accepted_exactly_once(
    stack: Stack,
) -> None:
    assert stack.client is not None
    stack.provider.storm([500] * 6 + [429] * 6)
    await stack.worker("one")
    async with api_client(stack.settings, stack.client) as api:
        key = await start_journeys(api, 6)
        books = await all_finished(stack, key, 6)
    print(f"provider refused {stack.provider.refused} requests (500 then 429 + Retry-After)")
    assert stack.provider.refused == 12 and stack.provider.storm_left() == 0
    # A 500 or 429 provably did not take the message: it is sent again, and then only once.
    assert books.messages_by_status == {"sent": 12}
    assert books.accepted_by_provider == 12


async def _true(value: bool) -> bool:
    return value


async def _undelivered(stack: Stack, key: str, expected: int) -> bool:
    books = await read_books(stack.settings, stack.provider, [key], MESSAGES_PER_JOURNEY)
    return books.events_undelivered == expected


@pytest.fixture
def sendgrid_fake() -> Iterator[FakeProvider]:
    server = FakeProvider([])
    yield server
    server.close()


async def test_a_rate_limited_send_waits_as_long_as_the_provider_asks(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid_fake: FakeProvider,
) -> None:
    status, headers, body = sendgrid_error(429, "too many requests")
    sendgrid_fake.answers = [(status, {**headers, "Retry-After": "1800"}, body), accepted("sg-1")]
    key = await journey(time_api, [{"id": "offer", "type": "email", "template": unique("t")}])
    person = await contact(time_api)
    async with build_worker(time_env.client, through_sendgrid(settings, sendgrid_fake)):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent" and len(sendgrid_fake.calls) == 2
    scheduled = started = None
    async for event in time_env.client.get_workflow_handle(
        enrolled["workflow_id"]
    ).fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == "send_email":
                scheduled = event.event_time.ToDatetime()
        if event.HasField("activity_task_started_event_attributes") and scheduled:
            started = event
            break
    assert scheduled is not None and started is not None
    assert started.activity_task_started_event_attributes.attempt == 2
    # The second attempt came when SendGrid said, not after the 2 s of the retry policy.
    waited = started.event_time.ToDatetime() - scheduled
    assert timedelta(minutes=30) <= waited < timedelta(minutes=31)
