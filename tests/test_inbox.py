"""No event is ever lost: with Temporal down the API still acknowledges what it stored,
and the inbox drain delivers it once Temporal is back; with the database down, the
routes that store events answer 503 so senders retry."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.inbox import InboxDrain
from api.main import create_app
from models.contracts import SEARCH_ATTRIBUTES
from models.db import session_scope
from models.tables import Event
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step
from tests.test_journey_language import enrollments_of
from worker import build_worker

BIN = Path(sys.executable).parent
# The drain leaves younger events to the API's own delivery; here every event is fair game.
NO_GRACE: dict[str, Any] = {"grace": timedelta(0)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RestartableTemporal:
    """A dev server of this test's own, stopped and started again on the same port and
    database file, as an operator restarting Temporal would."""

    def __init__(self, db_file: Path) -> None:
        self.db_file = db_file
        self.port = free_port()
        self.env: WorkflowEnvironment | None = None

    async def start(self) -> Client:
        self.env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(BIN / "temporal"),
            port=self.port,
            search_attributes=SEARCH_ATTRIBUTES,
            dev_server_extra_args=["--db-filename", str(self.db_file)],
        )
        return self.env.client

    async def stop(self) -> None:
        if self.env is not None:
            await self.env.shutdown()
            self.env = None


@pytest.fixture
async def temporal(tmp_path: Path) -> AsyncIterator[RestartableTemporal]:
    server = RestartableTemporal(tmp_path / "temporal.db")
    yield server
    await server.stop()


def api_client(settings: Settings, temporal: Client | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings, temporal=temporal)),
        base_url="http://nurture.test",
        headers={"Authorization": f"Bearer {settings.api_key}"},
    )


async def events_of(settings: Settings, contact_id: str) -> list[Event]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Event)
            .where(Event.contact_id == uuid.UUID(contact_id))
            .order_by(col(Event.received_at))
        )
        return list(rows.all())


async def waiting_journey(api: httpx.AsyncClient, event: str) -> tuple[dict[str, Any], str]:
    """A contact enrolled in a journey that waits for ``event``; (contact, enrollment id)."""
    template = unique("tpl")
    await put_template(api, template)
    key = unique("inbox")
    await publish(
        api,
        {
            "key": key,
            "name": "Waits for an event",
            "steps": [
                {"id": "waiting", "type": "wait_for", "event": event, "on_event": "hold"},
                {"id": "hold", "type": "wait", "duration": "30d"},
            ],
        },
    )
    person = await contact(api)
    enrollment = (await enroll(api, key, person["id"]))["enrollment"]
    # Truly waiting, not still loading the contact: an event signalled before the step
    # starts is not one it waits for.
    deadline = asyncio.get_running_loop().time() + 20
    while (await wait_for_step(api, enrollment["id"], "waiting"))["waiting_for"] is None:
        assert asyncio.get_running_loop().time() < deadline, "the journey never waited"
        await asyncio.sleep(0.1)
    return person, str(enrollment["id"])


async def test_events_stored_while_temporal_is_down_are_delivered_after(
    temporal: RestartableTemporal, settings: Settings
) -> None:
    client = await temporal.start()
    async with build_worker(client, settings), api_client(settings, client) as api:
        person, enrollment_id = await waiting_journey(api, "pricing_viewed")

        await temporal.stop()
        tracked = await api.post(
            "/v1/events",
            json={"contact_id": person["id"], "name": "pricing_viewed", "id": unique("ev")},
        )
        assert tracked.status_code == 202, tracked.text
        assert tracked.json()["delivered_to"] == 0
        filled = await api.post(
            "/webhooks/forms/demo", data={"email": person["email"], "company": "Acme"}
        )
        assert filled.status_code == 202, filled.text
        stored = await events_of(settings, person["id"])
        assert {e.name for e in stored} == {"pricing_viewed", "form_submitted"}
        assert all(e.delivered_at is None for e in stored)

        # The API keeps its client: it reconnects by itself once the server is back.
        await temporal.start()
        drain = InboxDrain(settings, client, **NO_GRACE)
        delivered = await drain.drain_once()
        assert sorted(delivered) == sorted(e.id for e in stored)
        assert await drain.drain_once() == []
        await wait_for_step(api, enrollment_id, "hold")
        assert all(e.delivered_at is not None for e in await events_of(settings, person["id"]))


async def test_the_api_starts_without_temporal_and_connects_later(
    temporal: RestartableTemporal, settings: Settings
) -> None:
    app_settings = settings.model_copy(update={"temporal_address": f"127.0.0.1:{temporal.port}"})
    async with api_client(app_settings, None) as api:
        template = unique("tpl")
        await put_template(api, template)
        key = unique("triggered")
        await publish(
            api,
            {
                "key": key,
                "name": "Starts on an event",
                "trigger": {"event": "pricing_viewed"},
                "steps": [{"id": "hold", "type": "wait", "duration": "30d"}],
            },
        )
        person = await contact(api)
        tracked = await api.post(
            "/v1/events", json={"contact_id": person["id"], "name": "pricing_viewed"}
        )
        assert tracked.status_code == 202, tracked.text
        [event] = await events_of(settings, person["id"])
        assert event.delivered_at is None

        client = await temporal.start()
        async with build_worker(client, settings):
            assert await InboxDrain(settings, client, **NO_GRACE).drain_once() == [event.id]
            [enrollment] = await enrollments_of(settings, key)
            # The API's own client, made while Temporal was down, now reaches it.
            await wait_for_step(api, str(enrollment.id), "hold")


async def test_concurrent_drains_deliver_each_event_once(
    temporal: RestartableTemporal, settings: Settings
) -> None:
    client = await temporal.start()
    async with build_worker(client, settings), api_client(settings, client) as api:
        # Events the journey listens to: one nobody listens to needs no Temporal.
        person, _ = await waiting_journey(api, "clicked")
        await temporal.stop()
        for _ in range(12):
            response = await api.post(
                "/v1/events", json={"contact_id": person["id"], "name": "clicked"}
            )
            assert response.status_code == 202, response.text
        await temporal.start()

        drains = [InboxDrain(settings, client, batch_size=3, **NO_GRACE) for _ in range(2)]

        async def drain_all(drain: InboxDrain) -> list[uuid.UUID]:
            claimed: list[uuid.UUID] = []
            while batch := await drain.drain_once():
                claimed += batch
            return claimed

        first, second = await asyncio.gather(*(drain_all(d) for d in drains))
        stored = {e.id for e in await events_of(settings, person["id"])}
        assert len(first) + len(second) == len(stored) == 12
        assert set(first) | set(second) == stored
        assert all(e.delivered_at is not None for e in await events_of(settings, person["id"]))


async def test_drain_loop_rides_out_an_outage_and_stops_cleanly(
    temporal: RestartableTemporal, settings: Settings
) -> None:
    client = await temporal.start()
    async with build_worker(client, settings), api_client(settings, client) as api:
        person, enrollment_id = await waiting_journey(api, "pricing_viewed")
        await temporal.stop()
        response = await api.post(
            "/v1/events", json={"contact_id": person["id"], "name": "pricing_viewed"}
        )
        assert response.status_code == 202, response.text
        drain = InboxDrain(settings, client, poll_seconds=0.1, **NO_GRACE)
        async with drain:
            await asyncio.sleep(1)  # rounds fail meanwhile; the loop carries on
            await temporal.start()
            await wait_for_step(api, enrollment_id, "hold", seconds=30)
        assert drain._task is None
        [event] = await events_of(settings, person["id"])
        assert event.delivered_at is not None


async def test_routes_answer_503_while_the_database_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/x"})
    async with api_client(down, None) as api:
        calls: tuple[tuple[str, dict[str, Any]], ...] = (
            ("/v1/events", {"json": {"email": "ada@example.com", "name": "x"}}),
            ("/webhooks/forms/x", {"data": {"email": "ada@example.com"}}),
            ("/healthz", {}),
        )
        for path, kwargs in calls:
            if kwargs:
                response = await api.post(path, **kwargs)
            else:
                response = await api.get(path)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Retry-After"].isdigit()
            assert response.json() == {"detail": "database unavailable, retry later"}
