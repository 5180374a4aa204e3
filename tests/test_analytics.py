"""Journey metrics against hand-computed answers on a fixture of known rows, and segment
sizes over time written by the audience refresh."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, update

from activities.audience import AudienceChanges, refresh_audience
from api.analytics import MESSAGE_COUNTS, MessageFilter, message_metrics
from api.main import create_app
from models.db import session_scope
from models.tables import (
    Broadcast,
    Contact,
    Enrollment,
    EnrollmentStatus,
    Event,
    Journey,
    JourneyStatus,
    JourneyVersion,
    Message,
    MessageChannel,
    MessageStatus,
    Segment,
)
from settings import Settings
from tests.helpers import unique

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
GOAL = "exit_when met by event purchase_completed"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API without Temporal: metrics only read PostgreSQL."""
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://nurture.test",
        headers={"Authorization": f"Bearer {settings.api_key}"},
    ) as client:
        yield client


@dataclass
class Fixture:
    key: str
    other_key: str
    journey_id: uuid.UUID


def _h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def _document(key: str) -> dict[str, Any]:
    """A valid journey document (other code in this database reads published versions)."""
    steps = [{"id": step, "type": "email", "template": "t"} for step in ("offer", "resend")]
    return {"key": key, "name": key, "exit_when": {"event": "purchase_completed"}, "steps": steps}


async def _fixture(settings: Settings) -> Fixture:
    """Journey J (versions 1 and 2) with six enrollments and eight messages, and a second
    journey whose rows must never leak into J's numbers."""
    key, other_key = unique("metrics"), unique("other")
    async with session_scope(settings.database_url) as session:
        journey = Journey(key=key, name=key, status=JourneyStatus.active, current_version=2)
        other = Journey(key=other_key, name=other_key, status=JourneyStatus.active)
        session.add_all([journey, other])
        await session.flush()
        v1 = JourneyVersion(journey_id=journey.id, version=1, document=_document(key))
        v2 = JourneyVersion(journey_id=journey.id, version=2, document=_document(key))
        ov = JourneyVersion(journey_id=other.id, version=1, document=_document(other_key))
        session.add_all([v1, v2, ov])
        contacts = [Contact(email=f"{unique('c')}@example.com") for _ in range(7)]
        session.add_all(contacts)
        await session.flush()

        def enrollment(n: int, version: JourneyVersion, variant: str | None, **kw: Any) -> Any:
            return Enrollment(
                journey_id=version.journey_id,
                journey_version_id=version.id,
                contact_id=contacts[n].id,
                workflow_id=f"journey/{key}/contact/{contacts[n].id}",
                variant=variant,
                started_at=T0,
                **kw,
            )

        ex, done, act = EnrollmentStatus.exited, EnrollmentStatus.completed, EnrollmentStatus.active
        e = [
            enrollment(0, v1, "a", status=ex, goal=GOAL, ended_at=_h(1)),
            enrollment(1, v1, "b", status=ex, goal=GOAL, ended_at=_h(3)),
            enrollment(2, v1, "a", status=done, ended_at=_h(5)),
            enrollment(3, v2, "b", status=act),
            enrollment(4, v2, "a", status=ex, goal=GOAL, ended_at=_h(2)),
            enrollment(5, v2, None, status=ex, exit_reason="ended by an operator", ended_at=_h(4)),
            enrollment(6, ov, "a", status=ex, goal=GOAL, ended_at=_h(1)),
        ]
        session.add_all(e)

        def event(n: int, at: datetime, properties: dict[str, Any]) -> Event:
            return Event(
                idempotency_id=unique("ev"),
                contact_id=contacts[n].id,
                name="purchase_completed",
                properties=properties,
                occurred_at=at,
                received_at=at,
                delivered_at=at,  # history: nothing for the inbox drain of other tests
            )

        session.add_all(
            [
                event(0, _h(-24), {"value": 999}),  # before the enrollment: not attributed
                event(0, _h(50 / 60), {"value": 100}),
                event(1, _h(2), {"value": "25.5"}),
                event(4, _h(1.5), {"plan": "pro"}),  # a goal without a value
                event(6, _h(0.5), {"value": 7}),  # the other journey's
            ]
        )

        versions = {v.id: v.version for v in (v1, v2, ov)}

        def message(n: int, step: str, variant: str | None, **kw: Any) -> Message:
            status = kw.pop("status", MessageStatus.sent)
            sent = status not in (MessageStatus.skipped, MessageStatus.failed)
            return Message(
                idempotency_key=unique("m"),
                contact_id=e[n].contact_id,
                enrollment_id=e[n].id,
                journey_id=e[n].journey_id,
                step_id=step,
                variant=variant,
                journey_version=versions[e[n].journey_version_id],
                channel=MessageChannel.email,
                provider="outbox",
                status=status,
                sent_at=_h(0.1) if sent else None,
                **kw,
            )

        at = _h(0.2)
        session.add_all(
            [
                message(0, "offer", "a", delivered_at=at, opened_at=at, clicked_at=at),
                message(1, "offer", "b", opened_at=at),
                message(2, "offer", "a", clicked_at=at),
                message(3, "offer", "b", bounced_at=at, status=MessageStatus.bounced),
                message(4, "resend", "a", delivered_at=at, complained_at=at),
                message(5, "resend", None, delivered_at=at, unsubscribed_at=at),
                message(0, "resend", "a", status=MessageStatus.skipped),
                message(1, "resend", "b", status=MessageStatus.failed),
                message(6, "offer", "a", delivered_at=at, opened_at=at),
            ]
        )
        await session.commit()
        return Fixture(key, other_key, journey.id)


def _messages(**counts: int) -> dict[str, int]:
    return {name: counts.get(name, 0) for name in MESSAGE_COUNTS}


def _pick(row: dict[str, Any], names: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in names}


async def test_journey_metrics_match_hand_computed_answers(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    fx = await _fixture(settings)
    response = await api.get(f"/v1/journeys/{fx.key}/metrics")
    assert response.status_code == 200, response.text
    body = response.json()

    # Six enrollments: 3 reached the goal after 1h, 3h and 2h; 125.5 of revenue (100 + "25.5";
    # the third goal event has no value, and the 999 purchase came before the enrollment).
    assert body["enrollments"] == {
        "enrolled": 6,
        "active": 1,
        "completed": 1,
        "exited": 4,
        "failed": 0,
        "conversions": 3,
        "conversion_rate": 0.5,
        "median_conversion_seconds": 7200.0,
        "revenue": 125.5,
    }
    # Eight messages: six sent; an open or a click counts as delivered, a click as opened.
    expected = _messages(
        total=8, sent=6, delivered=5, opened=3, clicked=2, bounced=1, complained=1,
        unsubscribed=1, failed=1, skipped=1,
    )  # fmt: skip
    assert _pick(body["messages"], expected) == expected
    assert body["messages"]["delivery_rate"] == round(5 / 6, 4)
    assert body["messages"]["open_rate"] == 0.5
    assert body["messages"]["click_rate"] == round(2 / 6, 4)
    assert body["messages"]["click_to_open_rate"] == round(2 / 3, 4)
    assert body["messages"]["bounce_rate"] == round(1 / 6, 4)
    assert body["messages"]["unsubscribe_rate"] == round(1 / 6, 4)

    steps = {s["step"]: s["messages"] for s in body["by_step"]}
    offer = _messages(total=4, sent=4, delivered=3, opened=3, clicked=2, bounced=1)
    resend = _messages(
        total=4, sent=2, delivered=2, complained=1, unsubscribed=1, failed=1, skipped=1
    )
    assert set(steps) == {"offer", "resend"}
    assert _pick(steps["offer"], offer) == offer
    assert _pick(steps["resend"], resend) == resend
    assert steps["resend"]["open_rate"] == 0.0 and steps["offer"]["open_rate"] == 0.75

    versions = {v["version"]: v for v in body["by_version"]}
    assert _pick(versions[1]["enrollments"], {"enrolled": 0, "conversions": 0, "revenue": 0}) == {
        "enrolled": 3,
        "conversions": 2,
        "revenue": 125.5,
    }
    assert versions[1]["enrollments"]["median_conversion_seconds"] == 7200.0  # of 1h and 3h
    assert _pick(versions[2]["enrollments"], {"enrolled": 0, "conversions": 0, "revenue": 0}) == {
        "enrolled": 3,
        "conversions": 1,
        "revenue": None,
    }
    v1 = _messages(total=5, sent=3, delivered=3, opened=3, clicked=2, failed=1, skipped=1)
    v2 = _messages(total=3, sent=3, delivered=2, bounced=1, complained=1, unsubscribed=1)
    assert _pick(versions[1]["messages"], v1) == v1
    assert _pick(versions[2]["messages"], v2) == v2

    variants = {v["variant"]: v for v in body["by_variant"]}
    assert set(variants) == {"a", "b"}
    assert _pick(variants["a"]["enrollments"], {"enrolled": 0, "conversions": 0}) == {
        "enrolled": 3,
        "conversions": 2,
    }
    assert variants["a"]["enrollments"]["revenue"] == 100.0
    assert variants["a"]["enrollments"]["conversion_rate"] == round(2 / 3, 4)
    assert variants["b"]["enrollments"]["revenue"] == 25.5
    a = _messages(total=4, sent=3, delivered=3, opened=2, clicked=2, complained=1, skipped=1)
    b = _messages(total=3, sent=2, delivered=1, opened=1, bounced=1, failed=1)
    assert _pick(variants["a"]["messages"], a) == a
    assert _pick(variants["b"]["messages"], b) == b


async def test_journey_metrics_filtered_by_version(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    fx = await _fixture(settings)
    body = (await api.get(f"/v1/journeys/{fx.key}/metrics", params={"version": 2})).json()
    assert body["version"] == 2
    assert body["enrollments"]["enrolled"] == 3 and body["enrollments"]["conversions"] == 1
    assert body["messages"]["total"] == 3 and body["messages"]["sent"] == 3
    assert [v["version"] for v in body["by_version"]] == [2]
    # The other journey: one enrollment, one message, its own revenue.
    other = (await api.get(f"/v1/journeys/{fx.other_key}/metrics")).json()
    assert other["enrollments"]["enrolled"] == 1 and other["enrollments"]["revenue"] == 7.0
    assert other["messages"]["opened"] == 1


async def test_message_metrics_take_any_filter_and_dimension(settings: Settings) -> None:
    fx = await _fixture(settings)
    async with session_scope(settings.database_url) as session:
        rows = await message_metrics(
            session, MessageFilter(journey_id=fx.journey_id, step_id="offer"), ("variant",)
        )
        assert rows[0].key == {} and rows[0].counts["total"] == 4
        by_variant = {r.key["variant"]: r.counts["sent"] for r in rows[1:]}
        assert by_variant == {"a": 2, "b": 2}
        with pytest.raises(ValueError, match="unknown dimension"):
            await message_metrics(session, MessageFilter(), ("colour",))


async def test_journey_metrics_of_a_journey_with_nothing_yet(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    key = unique("empty")
    async with session_scope(settings.database_url) as session:
        session.add(Journey(key=key, name=key))
        await session.commit()
    body = (await api.get(f"/v1/journeys/{key}/metrics")).json()
    assert body["enrollments"]["enrolled"] == 0 and body["enrollments"]["conversion_rate"] is None
    assert body["messages"]["sent"] == 0 and body["messages"]["open_rate"] is None
    assert body["by_step"] == body["by_version"] == body["by_variant"] == []


async def test_journey_metrics_refuse_bad_input(api: httpx.AsyncClient, settings: Settings) -> None:
    fx = await _fixture(settings)
    missing = await api.get("/v1/journeys/no-such-journey/metrics")
    assert missing.status_code == 404 and "no-such-journey" in missing.text
    zero = await api.get(f"/v1/journeys/{fx.key}/metrics", params={"version": 0})
    assert zero.status_code == 422 and "version" in zero.text
    word = await api.get(f"/v1/journeys/{fx.key}/metrics", params={"version": "two"})
    assert word.status_code == 422 and "version" in word.text
    unknown = await api.get(f"/v1/journeys/{fx.key}/metrics", params={"version": 9})
    assert unknown.status_code == 404 and "version" in unknown.text
    bad_key = await api.get("/v1/journeys/Bad_Key/metrics")
    assert bad_key.status_code == 422
    anonymous = await api.get(f"/v1/journeys/{fx.key}/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401


async def _delivered(session: Any, changes: AudienceChanges) -> None:
    """Mark the derived events delivered: this test does not dispatch them, and the inbox
    drain of another test in this database must not find them."""
    ids = [event.id for event in changes.derived_events]
    if ids:
        await session.exec(update(Event).where(col(Event.id).in_(ids)).values(delivered_at=T0))


async def test_segment_sizes_over_time_are_recorded_by_full_refreshes(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    key, plan = unique("seg"), unique("plan")
    async with session_scope(settings.database_url) as session:
        segment = Segment(key=key, name=key, condition={"attr": "plan", "op": "eq", "value": plan})
        people = [Contact(email=f"{unique('s')}@example.com", attributes={"plan": plan})]
        people.append(Contact(email=f"{unique('s')}@example.com", attributes={"plan": "free"}))
        session.add_all([segment, *people])
        await session.commit()
    # Refreshes of every contact in this database: at the real time, so other tests'
    # time-based segments and score decay see nothing odd.
    first = datetime.now(UTC).replace(microsecond=0)
    second = first + timedelta(minutes=1)
    async with session_scope(settings.database_url) as session:
        await _delivered(session, await refresh_audience(session, now=first))
        await session.commit()
    async with session_scope(settings.database_url) as session:
        contact = await session.get(Contact, people[1].id)
        assert contact is not None
        contact.attributes = {"plan": plan}
        session.add(contact)
        await session.commit()
    async with session_scope(settings.database_url) as session:
        # A refresh of some contacts only (an event) records no size: it is not a census.
        some = await refresh_audience(
            session, now=first, contact_ids=[people[1].id], profile_changed=True
        )
        await _delivered(session, some)
        await _delivered(session, await refresh_audience(session, now=second))
        await session.commit()
    response = await api.get(f"/v1/segments/{key}/sizes")
    assert response.status_code == 200, response.text
    sizes = [(p["measured_at"], p["size"]) for p in response.json()["sizes"]]
    assert sizes == [
        (first.isoformat().replace("+00:00", "Z"), 1),
        (second.isoformat().replace("+00:00", "Z"), 2),
    ]
    since = await api.get(f"/v1/segments/{key}/sizes", params={"since": second.isoformat()})
    assert [p["size"] for p in since.json()["sizes"]] == [2]
    assert (await api.get("/v1/segments/nope/sizes")).status_code == 404
    naive = await api.get(f"/v1/segments/{key}/sizes", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422 and "since" in naive.text
    bad = await api.get(f"/v1/segments/{key}/sizes", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in bad.text


async def test_broadcast_metrics_match_hand_computed_answers(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Five emails and two SMS of one broadcast, plus a journey's email that must not count:
    sent counts every message that left (sent or later), opened includes clicked."""
    key = unique("bc")
    async with session_scope(settings.database_url) as session:
        broadcast = Broadcast(
            key=key,
            name="Spring sale",
            template_key="sale",
            segment_key="everyone",
            channel=MessageChannel.email,
            rate_per_second=10,
            burst=10,
            workflow_id=f"broadcast:{key}",
        )
        session.add(broadcast)
        await session.flush()
        statuses = [
            (MessageChannel.email, MessageStatus.clicked),
            (MessageChannel.email, MessageStatus.opened),
            (MessageChannel.email, MessageStatus.delivered),
            (MessageChannel.email, MessageStatus.bounced),
            (MessageChannel.email, MessageStatus.skipped),
            (MessageChannel.sms, MessageStatus.delivered),
            (MessageChannel.sms, MessageStatus.sent),
        ]
        for n, (channel, state) in enumerate(statuses):
            session.add(
                Message(
                    idempotency_key=f"{key}:{n}",
                    broadcast_id=broadcast.id,
                    channel=channel,
                    provider="outbox",
                    status=state,
                    sent_at=None if state == MessageStatus.skipped else T0,
                    delivered_at=T0 if state in ("delivered", "opened", "clicked") else None,
                    opened_at=T0 if state in ("opened", "clicked") else None,
                    clicked_at=T0 if state == "clicked" else None,
                    bounced_at=T0 if state == "bounced" else None,
                )
            )
        session.add(
            Message(
                idempotency_key=f"{key}:journey",
                channel=MessageChannel.email,
                provider="outbox",
                status=MessageStatus.clicked,
                sent_at=T0,
            )
        )
    answer = await api.get(f"/v1/broadcasts/{key}/metrics")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    totals = body["messages"]
    assert (totals["sent"], totals["delivered"], totals["opened"], totals["clicked"]) == (
        6,
        4,
        2,
        1,
    )
    assert (totals["bounced"], totals["skipped"]) == (1, 1)
    assert totals["open_rate"] == round(2 / 6, 4)  # rates are rounded to 4 places
    assert totals["click_rate"] == round(1 / 6, 4)
    by_channel = {row["channel"]: row for row in body["by_channel"]}
    assert by_channel["email"]["sent"] == 4 and by_channel["sms"]["sent"] == 2
    assert by_channel["sms"]["delivered"] == 1

    missing = await api.get("/v1/broadcasts/no-such-broadcast/metrics")
    assert missing.status_code == 404 and "no-such-broadcast" in missing.text
