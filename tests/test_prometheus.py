"""Prometheus /metrics: this process's counters move with what happens, and the
database-backed numbers equal the tables at scrape time; a worker serves its own."""

from __future__ import annotations

import socket
import urllib.request

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.counters import start_metrics_server
from models.db import session_scope
from settings import Settings
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_journey_language import journey
from tests.test_journey_workflow import result_of
from tests.test_providers import (  # noqa: F401  (fake is a fixture)
    FakeProvider,
    accepted,
    fake,
    sendgrid_error,
    through_sendgrid,
)
from worker import build_worker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_events_signals_and_webhook_verification_failures(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [{"id": "wait", "type": "wait_for", "event": "demo_booked"}, {"id": "x", "type": "exit"}],
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "wait")
    before = await scrape(time_api)

    event = {"id": unique("ev"), "contact_id": person["id"], "name": "demo_booked"}
    assert (await time_api.post("/v1/events", json=event)).status_code in (200, 201, 202)
    assert (await time_api.post("/v1/events", json=event)).status_code in (200, 201, 202)
    assert (await time_api.post("/webhooks/sendgrid", content=b"[]")).status_code == 403
    assert (await time_api.post("/webhooks/twilio/status", data={"a": "b"})).status_code == 403
    after = await scrape(time_api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("nurture_events_received_total", source="api") == 1  # the duplicate: not
    assert delta("nurture_signals_sent_total", signal="event") >= 1
    assert delta("nurture_webhook_verification_failures_total", provider="sendgrid") == 1
    assert delta("nurture_webhook_verification_failures_total", provider="twilio") == 1
    assert value(after, "nurture_enrollments_started_total", journey=key) == 1


async def test_metrics_read_messages_and_enrollments_from_the_database(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(time_api, [{"id": "hello", "type": "email", "template": unique("t")}])
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    samples = await scrape(time_api)
    async with session_scope(settings.database_url) as session:
        connection = await session.connection()
        messages = (
            await connection.execute(
                sa.text("SELECT channel, status, count(*) FROM messages GROUP BY 1, 2")
            )
        ).all()
        mine = (
            await connection.execute(
                sa.text(
                    "SELECT e.status, count(*) FROM enrollments e JOIN journeys j "
                    "ON j.id = e.journey_id WHERE j.key = :key GROUP BY 1"
                ),
                {"key": key},
            )
        ).all()
    assert messages
    for channel, state, count in messages:
        assert value(samples, "nurture_messages", channel=channel, status=state) == count
    assert [(s, c) for s, c in mine] == [("completed", 1)]
    assert value(samples, "nurture_enrollments", journey=key, status="completed") == 1


async def test_provider_errors_are_counted_by_channel_and_kind(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    fake: FakeProvider,  # noqa: F811
) -> None:
    fake.answers = [sendgrid_error(429, "slow down"), sendgrid_error(400, "bad sender")]
    key = await journey(time_api, [{"id": "offer", "type": "email", "template": unique("t")}])
    person = await contact(time_api)
    before = await scrape(time_api)
    async with build_worker(time_env.client, through_sendgrid(settings, fake)):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
    after = await scrape(time_api)
    for kind in ("retryable", "rejected"):
        name = "nurture_provider_errors_total"
        assert (
            value(after, name, channel="email", kind=kind)
            - value(before, name, channel="email", kind=kind)
            == 1
        ), kind


def test_worker_metrics_port_serves_the_process_counters() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    start_metrics_server(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"nurture_signals_sent", "nurture_provider_errors", "nurture_events_received"} <= names
