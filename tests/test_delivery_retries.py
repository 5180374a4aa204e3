"""Delivery that heals itself: an enrollment whose start failed is started later and gets the
events sent to it meanwhile (never taken for a closed journey), and events that keep failing
are retried later and later, then parked, without holding up the events behind them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from activities.delivery import deliver_events
from activities.inbox import InboxDrain
from models.db import session_scope
from models.tables import Contact, Event, utcnow
from settings import Settings
from tests.helpers import contact, publish, put_template, unique
from tests.test_inbox import RestartableTemporal, api_client, events_of
from tests.test_journey_language import enrollments_of
from worker import build_worker


@pytest.fixture
async def restartable(tmp_path: Path) -> AsyncIterator[RestartableTemporal]:
    server = RestartableTemporal(tmp_path / "temporal.db")
    yield server
    await server.stop()


async def test_an_enrollment_made_while_temporal_is_down_starts_later_with_its_events(
    restartable: RestartableTemporal, settings: Settings
) -> None:
    client = await restartable.start()
    async with build_worker(client, settings), api_client(settings, client) as api:
        key = unique("late")
        await publish(
            api,
            {
                "key": key,
                "name": "Leaves on purchase",
                # It also hears segment_entered (another segment's), so the derived event
                # below is one it listens to.
                "exit_when": {
                    "any": [
                        {"event": "purchase_completed"},
                        {
                            "event": "segment_entered",
                            "where": {"prop": "segment", "op": "eq", "value": "vips"},
                        },
                    ]
                },
                "steps": [{"id": "hold", "type": "wait", "duration": "30d"}],
            },
        )
        person = await contact(api)

        await restartable.stop()
        refused = await api.post(
            f"/v1/journeys/{key}/enrollments",
            json={"contact_id": person["id"], "trigger": {"plan": "pro"}},
        )
        assert refused.status_code == 503, refused.text
        [row] = await enrollments_of(settings, key)
        assert row.run_id is None and row.status == "active"
        assert row.trigger == {"plan": "pro"}

        await restartable.start()
        # Temporal is back but the run never started: the event must not be taken as sent
        # to a closed journey (and marked delivered); it waits for the drain.
        tracked = await api.post(
            "/v1/events", json={"contact_id": person["id"], "name": "purchase_completed"}
        )
        assert tracked.status_code == 202, tracked.text
        assert tracked.json()["delivered_to"] == 0
        [event] = await events_of(settings, person["id"])
        assert event.delivered_at is None
        # Changes that reach running journeys do not fail on one that has not started (it
        # reads the contact and the journey's status when it starts).
        patched = await api.patch(
            f"/v1/contacts/{person['id']}", json={"attributes": {"plan": "pro"}}
        )
        assert patched.status_code == 200, patched.text
        assert (await api.post(f"/v1/journeys/{key}/pause")).status_code == 200
        assert (await api.post(f"/v1/journeys/{key}/resume")).status_code == 200
        # A derived event (a segment refresh's) for it is left for the drain, not failed.
        [derived] = await _store_events(
            settings, person["id"], [("segment_entered", {"segment": "pros"})], source="derived"
        )
        async with session_scope(settings.database_url) as session:
            derived_row = await session.get(Event, derived)
            assert derived_row is not None
            assert await deliver_events(session, client, settings, [derived_row]) == 0
        stored = await events_of(settings, person["id"])
        assert len(stored) == 2 and all(e.delivered_at is None for e in stored)

        drain = InboxDrain(settings, client, grace=timedelta(0))
        assert sorted(await drain.drain_once()) == sorted(e.id for e in stored)
        [row] = await enrollments_of(settings, key)
        assert row.run_id is not None
        handle = client.get_workflow_handle(row.workflow_id)
        started = None
        async for history_event in handle.fetch_history_events():
            started = history_event.workflow_execution_started_event_attributes
            break
        assert started is not None
        assert b'"plan":"pro"' in started.input.payloads[0].data.replace(b" ", b"")
        # The journey got the purchase and left on its goal.
        deadline = asyncio.get_running_loop().time() + 20
        while (await enrollments_of(settings, key))[0].status == "active":
            assert asyncio.get_running_loop().time() < deadline, "the goal was never met"
            await asyncio.sleep(0.1)
        [row] = await enrollments_of(settings, key)
        assert (row.status, row.goal) == ("exited", "exit_when met by event purchase_completed")


async def _store_events(
    settings: Settings,
    contact_id: str,
    names_props: list[tuple[str, dict[str, Any]]],
    source: str = "api",
) -> list[uuid.UUID]:
    """Rows as the API stores them, received a minute ago one after the other."""
    ids = []
    async with session_scope(settings.database_url) as session:
        base = utcnow() - timedelta(minutes=1)
        for index, (name, properties) in enumerate(names_props):
            event = Event(
                idempotency_id=unique("ev"),
                contact_id=uuid.UUID(contact_id),
                name=name,
                properties=properties,
                received_at=base + timedelta(milliseconds=index),
                source=source,
            )
            session.add(event)
            ids.append(event.id)
    return ids


async def test_failing_events_back_off_and_park_without_starving_the_others(
    restartable: RestartableTemporal, settings: Settings
) -> None:
    client = await restartable.start()
    async with build_worker(client, settings), api_client(settings, client) as api:
        template = unique("tpl")
        await put_template(api, template)
        key = unique("cart")
        await publish(
            api,
            {
                "key": key,
                "name": "One run per cart",
                "trigger": {"event": "cart_updated", "key": "cart_id"},
                "steps": [{"id": "hold", "type": "wait", "duration": "30d"}],
            },
        )
        person = await contact(api)
        # A cart id longer than any run key can be: starting its run fails in the database
        # every time, for a reason retrying does not cure.
        poison = await _store_events(
            settings, person["id"], [("cart_updated", {"cart_id": "x" * 300})] * 4
        )
        good = await _store_events(
            settings,
            person["id"],
            [("cart_updated", {"cart_id": "c-1"}), ("page_viewed", {"page": "/pricing"})],
        )
        drain = InboxDrain(
            settings, client, grace=timedelta(0), batch_size=3, max_attempts=3,
            retry_base_seconds=60,
        )  # fmt: skip

        # Round 1 meets three poison events; they wait a minute. Round 2 reaches the rest.
        assert await drain.drain_once() == []
        assert set(await drain.drain_once()) == set(good)
        assert await drain.drain_once() == []
        [run] = await enrollments_of(settings, key)
        assert run.run_key == "c-1"

        rows = {e.id: e for e in await events_of(settings, person["id"])}
        for event_id in poison:
            event = rows[event_id]
            assert event.delivered_at is None and event.delivery_attempts == 1
            assert event.next_delivery_at is not None
            assert event.next_delivery_at > utcnow() + timedelta(seconds=50)
            assert "DataError" in (event.delivery_error or "")
            assert "value too long" in (event.delivery_error or "")

        async def time_passes() -> None:
            async with session_scope(settings.database_url) as session:
                await (await session.connection()).execute(
                    sa.update(Event)
                    .where(col(Event.id).in_(poison))
                    .values(next_delivery_at=sa.func.now())
                )

        for attempt in (2, 3):
            await time_passes()
            while await drain.drain_once() or any(
                e.delivery_attempts < attempt
                for e in await events_of(settings, person["id"])
                if e.id in poison
            ):
                pass
        rows = {e.id: e for e in await events_of(settings, person["id"])}
        for event_id in poison:
            event = rows[event_id]
            assert event.delivery_attempts == 3
            assert event.delivery_parked_at is not None and event.delivered_at is None
            assert "value too long" in (event.delivery_error or "")
        # Parked events are left alone, even once their time would have come.
        await time_passes()
        assert await drain.drain_once() == []
        assert all(
            e.delivery_attempts == 3
            for e in await events_of(settings, person["id"])
            if e.id in poison
        )
        async with session_scope(settings.database_url) as session:
            parked = (
                await session.exec(
                    select(Event.id)
                    .where(col(Event.delivery_parked_at).is_not(None))
                    .where(Event.contact_id == uuid.UUID(person["id"]))
                )
            ).all()
            assert set(parked) == set(poison)
            assert await session.get(Contact, uuid.UUID(person["id"])) is not None
