"""best_time waits: synthetic engagement histories with known answers, checked against the
workflow's own wake-up time on Temporal's time-skipping server (real activities, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.optimisation import best_hour
from models.journey import JourneyValidationError, parse_journey
from settings import Settings
from tests.helpers import contact, enroll, wait_for_step
from tests.test_journey_language import journey, left_at, state
from tests.test_journey_workflow import messages_of, result_of


def local(day: datetime, clock: time, zone: ZoneInfo) -> datetime:
    """``clock`` on the local date of ``day`` in ``zone`` (no DST gap at the times used)."""
    return datetime.combine(day.astimezone(zone).date(), clock, tzinfo=zone)


def weeks_before(now: datetime, weekday: int, clock: time, zone: ZoneInfo, weeks: int) -> datetime:
    """The local ``weekday`` at ``clock``, ``weeks`` whole weeks before the week of ``now``."""
    today = now.astimezone(zone)
    monday = today - timedelta(days=today.weekday())
    return local(monday + timedelta(days=weekday - 7 * weeks), clock, zone)


def next_local(now: datetime, weekdays: set[int], clock: time, zone: ZoneInfo) -> datetime:
    """The first local ``clock`` on one of ``weekdays`` at or after ``now``, worked out
    day by day (independently of models.schedule)."""
    for days in range(9):
        candidate = local(now + timedelta(days=days), clock, zone)
        if candidate.weekday() in weekdays and candidate >= now.replace(microsecond=0):
            return candidate
    raise AssertionError("no such day")


def expected_wakeup(now: datetime, weekday: int, hour: int, zone: ZoneInfo) -> datetime:
    """Inside that local hour already: now; else the next time it begins."""
    here = now.astimezone(zone)
    if here.weekday() == weekday and here.hour == hour:
        return now.replace(microsecond=0)
    return next_local(now, {weekday}, time(hour), zone)


async def wakeup_of(api: httpx.AsyncClient, enrollment_id: str) -> dict[str, Any]:
    """The enrollment's state once its best_time wait has set its wake-up time."""
    await wait_for_step(api, enrollment_id, "best")
    for _ in range(200):
        view = await state(api, enrollment_id)
        if view["next_wakeup"] is not None:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"no wake-up time: {view}")


async def engage(
    api: httpx.AsyncClient, person: dict[str, Any], moments: list[datetime], **extra: Any
) -> None:
    """Post opens/clicks that happened at ``moments`` (alternating event names)."""
    for n, moment in enumerate(moments):
        response = await api.post(
            "/v1/events",
            json={
                "id": f"engage-{person['id']}-{moment.isoformat()}-{n}",
                "contact_id": person["id"],
                "name": "email_clicked" if n % 2 else "email_opened",
                "occurred_at": moment.astimezone(UTC).isoformat(),
                "properties": extra,
            },
        )
        assert response.status_code == 202, response.text


async def best_time_journey(api: httpx.AsyncClient, **top: Any) -> str:
    return await journey(
        api,
        [
            {"id": "best", "type": "wait", "best_time": True},
            {"id": "hello", "type": "email", "template": f"bt-{api.headers['x-run']}"},
        ],
        **top,
    )


@pytest.fixture
def run_id(time_api: httpx.AsyncClient) -> str:
    time_api.headers["x-run"] = uuid.uuid4().hex[:8]
    return time_api.headers["x-run"]


async def test_best_time_waits_for_the_hour_the_contact_clicks_most(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    run_id: str,
) -> None:
    paris = ZoneInfo("Europe/Paris")
    now = await time_env.get_current_time()
    key = await best_time_journey(time_api)
    person = await contact(time_api, timezone="Europe/Paris")
    # Known answer: five engagements on Tuesdays 09:xx Paris time, two on Thursdays 14:xx,
    # three SendGrid machine opens at Monday 03:00 (ignored), one older than 90 days.
    tuesdays = [weeks_before(now, 1, time(9, 5 + w), paris, w) for w in range(1, 6)]
    await engage(time_api, person, tuesdays)
    await engage(time_api, person, [weeks_before(now, 3, time(14, 30), paris, w) for w in (1, 2)])
    machine = [weeks_before(now, 0, time(3, 0), paris, w) for w in (1, 2, 3)]
    await engage(time_api, person, machine, sg_machine_open=True)
    await engage(time_api, person, [weeks_before(now, 4, time(18, 0), paris, 15)] * 1)

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    view = await wakeup_of(time_api, enrolled["id"])

    expected = expected_wakeup(now, 1, 9, paris)
    assert datetime.fromisoformat(view["next_wakeup"]) == expected
    choice = view["choices"]["best"]
    assert choice["kind"] == "send_time"
    assert choice["choice"] == "tue 09:00 Europe/Paris"
    assert choice["reason"] == (
        "opened/clicked 5 times on Tuesdays 09:00-10:00 (Europe/Paris), 7 in 90 days"
    )
    assert "Tuesdays 09:00-10:00" in view["waiting_for"]

    await result_of(time_env, enrolled["workflow_id"])
    done = await state(time_api, enrolled["id"])
    assert timedelta(0) <= left_at(done, "best") - expected < timedelta(seconds=1)
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent"
    # The Temporal UI labels the timer with the choice.
    history = await time_env.client.get_workflow_handle(enrolled["workflow_id"]).fetch_history()
    timers = [
        json.loads(e.user_metadata.summary.data)
        for e in history.events
        if e.HasField("timer_started_event_attributes")
    ]
    assert timers == ["Wait for the best time tue 09:00 Europe/Paris (step best)"]


async def test_best_time_tie_goes_to_the_earliest_hour_of_the_week(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker, run_id: str
) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    now = await time_env.get_current_time()
    key = await best_time_journey(time_api)
    person = await contact(time_api, timezone="Asia/Tokyo")
    # Two each on Wednesday 18:00 and Tuesday 20:00 (local): Tuesday comes first in the week.
    await engage(time_api, person, [weeks_before(now, 2, time(18, 10), tokyo, w) for w in (1, 2)])
    await engage(time_api, person, [weeks_before(now, 1, time(20, 40), tokyo, w) for w in (1, 3)])

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    view = await wakeup_of(time_api, enrolled["id"])

    assert view["choices"]["best"]["choice"] == "tue 20:00 Asia/Tokyo"
    assert datetime.fromisoformat(view["next_wakeup"]) == expected_wakeup(now, 1, 20, tokyo)


async def test_best_time_falls_back_to_the_journey_send_time_with_too_little_history(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker, run_id: str
) -> None:
    zone = ZoneInfo("America/Sao_Paulo")
    now = await time_env.get_current_time()
    key = await best_time_journey(
        time_api,
        default_timezone="America/Sao_Paulo",
        send_time={"time": "08:30", "weekdays": ["wed"], "min_engagements": 3},
    )
    person = await contact(time_api)  # no zone of its own: the journey's default
    await engage(time_api, person, [weeks_before(now, 5, time(7, 0), zone, w) for w in (1, 2)])

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    view = await wakeup_of(time_api, enrolled["id"])

    assert datetime.fromisoformat(view["next_wakeup"]) == next_local(now, {2}, time(8, 30), zone)
    assert view["choices"]["best"]["reason"] == (
        "only 2 opens/clicks in 90 days, fewer than 3: journey default 08:30 wed America/Sao_Paulo"
    )


async def test_best_time_counts_local_hours_across_a_dst_change(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker, run_id: str
) -> None:
    """Engagements at 09:xx New York time on both sides of a DST change are one local hour
    (13:xx UTC in summer, 14:xx UTC in winter), and the wait ends at 09:00 local."""
    new_york = ZoneInfo("America/New_York")
    start = await time_env.get_current_time()
    # Skip the server's clock to three weeks after New York's next DST change.
    day = start
    while (day + timedelta(days=1)).astimezone(new_york).utcoffset() == day.astimezone(
        new_york
    ).utcoffset():
        day += timedelta(days=1)
    await time_env.sleep(day + timedelta(weeks=3) - start)
    now = await time_env.get_current_time()
    moments = [weeks_before(now, 3, time(9, 20), new_york, w) for w in range(1, 7)]
    assert len({m.astimezone(UTC).hour for m in moments}) == 2  # both offsets are in
    key = await best_time_journey(time_api)
    person = await contact(time_api, timezone="America/New_York")
    await engage(time_api, person, moments)

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    view = await wakeup_of(time_api, enrolled["id"])

    assert view["choices"]["best"]["choice"] == "thu 09:00 America/New_York"
    assert "6 times" in view["choices"]["best"]["reason"]
    assert datetime.fromisoformat(view["next_wakeup"]) == expected_wakeup(now, 3, 9, new_york)


async def test_best_time_inside_the_best_hour_proceeds_at_once(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker, run_id: str
) -> None:
    if (await time_env.get_current_time()).minute >= 55:
        await time_env.sleep(timedelta(minutes=6))  # not at the very end of an hour
    now = await time_env.get_current_time()
    utc = ZoneInfo("UTC")
    key = await best_time_journey(time_api)
    person = await contact(time_api, timezone="UTC")
    # The current hour of the week, three weeks running: the best time is now.
    this_hour = now.astimezone(utc)
    await engage(time_api, person, [this_hour - timedelta(weeks=w) for w in (1, 2, 3)])

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    view = await state(time_api, enrolled["id"])

    record = next(h for h in view["history"] if h["step_id"] == "best")
    assert record["outcome"].startswith("best time is now")
    assert left_at(view, "best") - now < timedelta(minutes=5)


def test_best_hour_rules_on_plain_histograms() -> None:
    assert best_hour([(1, 9, 4), (3, 14, 4), (0, 23, 1)], 3).hour == 9  # tie: Tuesday first
    assert best_hour([(6, 8, 2)], 3).weekday is None  # too little history
    assert best_hour([], 1).engagements == 0


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {"id": "w", "type": "wait", "best_time": True, "duration": "1d"},
            "exactly one of duration, until, best_time",
        ),
        ({"id": "w", "type": "wait", "best_time": False}, "exactly one of"),
    ],
)
def test_best_time_wait_shape_is_validated(step: dict[str, Any], message: str) -> None:
    with pytest.raises(JourneyValidationError) as caught:
        parse_journey({"key": "k", "name": "k", "steps": [step]})
    assert caught.value.problems[0]["step"] == "w"
    assert message in caught.value.problems[0]["message"]


async def test_send_time_setting_is_validated_by_the_api(
    time_api: httpx.AsyncClient,
) -> None:
    body = {
        "key": "bad-send-time",
        "name": "Bad",
        "send_time": {"time": "25:00", "weekdays": []},
        "steps": [{"id": "w", "type": "wait", "best_time": True}],
    }
    response = await time_api.post("/v1/journeys", json=body)
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["detail"]["errors"]}
    assert fields == {"send_time.time", "send_time.weekdays"}
    assert (await time_api.get("/v1/journeys/bad-send-time")).status_code == 404
