"""Segments: defined with the condition language, computed in SQL, kept current as events
and attributes change, and usable by journeys (trigger, wait_for, exit_when)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlmodel import col, func, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.db import session_scope
from models.tables import Event, Segment, SegmentMember
from settings import Settings
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_journey_language import enrollments_of, journey
from tests.test_journey_workflow import result_of
from workflows.audience_refresh import SCHEDULE_ID, ensure_audience_schedule


async def put_segment(
    api: httpx.AsyncClient, key: str, condition: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    response = await api.put(
        f"/v1/segments/{key}", json={"name": key, "condition": condition, **fields}
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


async def members(api: httpx.AsyncClient, key: str) -> set[str]:
    found: set[str] = set()
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        response = await api.get(f"/v1/segments/{key}/members", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found |= {m["contact_id"] for m in page["members"]}
        after = page["next"]
        if after is None:
            return found


async def segment_events(settings: Settings, contact_id: str) -> list[tuple[str, str]]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Event.name, Event.properties)
            .where(Event.contact_id == uuid.UUID(contact_id))
            .where(col(Event.name).in_(["segment_entered", "segment_exited"]))
            .order_by(col(Event.received_at))
        )
        return [(name, props["segment"]) for name, props in rows.all()]


async def track(api: httpx.AsyncClient, contact_id: str, name: str, **props: Any) -> None:
    response = await api.post(
        "/v1/events", json={"contact_id": contact_id, "name": name, "properties": props}
    )
    assert response.status_code == 202, response.text


async def test_segment_members_follow_attributes_and_events(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    plan = unique("plan")
    bought = unique("bought")
    key = unique("seg")
    already = await contact(time_api, attributes={"plan": plan})
    other = await contact(time_api, attributes={"plan": "free"})
    created = await put_segment(
        time_api,
        key,
        {"any": [{"attr": "plan", "value": plan}, {"event": bought, "count_gte": 2}]},
        description="Paying or buying twice",
    )
    assert created["members"] == 1
    assert await members(time_api, key) == {already["id"]}

    # An attribute change moves a contact in; an event count crossing moves another in.
    await time_api.post(
        "/v1/contacts", json={"email": other["email"], "attributes": {"plan": plan}}
    )
    buyer = await contact(time_api)
    await track(time_api, buyer["id"], bought)
    assert buyer["id"] not in await members(time_api, key)
    await track(time_api, buyer["id"], bought)
    assert await members(time_api, key) == {already["id"], other["id"], buyer["id"]}
    # Leaving is an event too.
    await time_api.post(
        "/v1/contacts", json={"email": other["email"], "attributes": {"plan": None}}
    )
    assert other["id"] not in await members(time_api, key)
    assert await segment_events(settings, other["id"]) == [
        ("segment_entered", key),
        ("segment_exited", key),
    ]
    assert await segment_events(settings, buyer["id"]) == [("segment_entered", key)]

    got = await time_api.get(f"/v1/segments/{key}")
    assert got.status_code == 200 and got.json()["members"] == 2
    assert got.json()["description"] == "Paying or buying twice"
    listed = (await time_api.get("/v1/segments")).json()["segments"]
    assert key in {s["key"] for s in listed}
    preview = await time_api.post(
        "/v1/segments/preview", json={"condition": {"attr": "plan", "value": plan}}
    )
    assert preview.status_code == 200 and preview.json()["count"] == 1
    assert preview.json()["sample"] == [already["id"]]


async def test_segments_can_name_segments_and_refuse_cycles(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    tag = unique("tag")
    base, vip, loop = unique("base"), unique("vip"), unique("loop")
    person = await contact(time_api, tags=[tag])
    await put_segment(time_api, base, {"attr": "tags", "value": tag})
    await put_segment(time_api, vip, {"all": [{"segment": base}, {"attr": "vip", "value": True}]})
    assert await members(time_api, vip) == set()
    await time_api.post(
        "/v1/contacts", json={"email": person["email"], "attributes": {"vip": True}}
    )
    assert await members(time_api, vip) == {person["id"]}

    cycle = await time_api.put(
        f"/v1/segments/{base}", json={"name": "b", "condition": {"segment": vip}}
    )
    assert cycle.status_code == 422 and "refer to each other" in cycle.text, cycle.text
    unknown = await time_api.put(
        f"/v1/segments/{loop}", json={"name": "l", "condition": {"segment": "no-such-seg"}}
    )
    assert unknown.status_code == 422 and "unknown segment 'no-such-seg'" in unknown.text
    # The refused definitions changed nothing.
    assert (await time_api.get(f"/v1/segments/{base}")).json()["condition"] == {
        "attr": "tags",
        "op": "eq",
        "value": tag,
    }
    assert (await time_api.get(f"/v1/segments/{loop}")).status_code == 404

    in_use = await time_api.delete(f"/v1/segments/{base}")
    assert in_use.status_code == 409 and f"segment {vip!r}" in in_use.text
    assert (await time_api.delete(f"/v1/segments/{vip}")).status_code == 204
    assert (await time_api.delete(f"/v1/segments/{base}")).status_code == 204
    assert (await time_api.get(f"/v1/segments/{base}")).status_code == 404


async def test_segment_definitions_refuse_bad_input(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    async def count() -> int:
        async with session_scope(settings.database_url) as session:
            return (await session.exec(select(func.count()).select_from(Segment))).one()

    before = await count()
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("Bad Key", {"name": "x", "condition": {"attr": "a", "value": 1}}, 422, "pattern"),
        ("ok-key", {"name": "x"}, 422, "condition"),
        ("ok-key", {"name": "x", "condition": {"color": "red"}}, 422, "a condition needs one of"),
        (
            "ok-key",
            {"name": "x", "condition": {"attr": "a", "op": "in", "value": 3}},
            422,
            "needs a list value",
        ),
        (
            "ok-key",
            {"name": "x", "condition": {"event": "e", "within": "forever"}},
            422,
            "invalid duration",
        ),
        ("ok-key", {"name": "", "condition": {"attr": "a", "value": 1}}, 422, "name"),
        ("ok-key", {"name": "x", "condition": {"attr": "a"}, "extra": 1}, 422, "extra"),
    ]
    for key, body, code, expected in cases:
        response = await time_api.put(f"/v1/segments/{key}", json=body)
        assert response.status_code == code, (body, response.text)
        assert expected in response.text, (body, response.text)
    not_json = await time_api.put(
        "/v1/segments/ok-key",
        content=b'{"name": "x", "condition": {"attr": "a", "value": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 422 and "NaN and Infinity" in not_json.text
    assert await count() == before
    assert (await time_api.get("/v1/segments/no-such")).status_code == 404
    assert (await time_api.get("/v1/segments/no-such/members")).status_code == 404
    bad_page = await time_api.get("/v1/segments/no-such/members", params={"limit": 0})
    assert bad_page.status_code == 422
    bad_preview = await time_api.post("/v1/segments/preview", json={"condition": {"x": 1}})
    assert bad_preview.status_code == 422 and "a condition needs one of" in bad_preview.text


async def test_journeys_enter_wait_for_and_exit_on_segments(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    trial, customers = unique("trial"), unique("customers")
    plan = unique("plan")
    await put_segment(time_api, trial, {"attr": "plan", "value": plan})
    await put_segment(time_api, customers, {"attr": "lifecycle_stage", "value": "customer"})
    unknown = await time_api.post(
        "/v1/journeys",
        json={
            "key": unique("j"),
            "name": "x",
            "trigger": {"segment": "no-such-segment"},
            "steps": [{"id": "x", "type": "exit"}],
        },
    )
    assert unknown.status_code == 201
    refused = await time_api.post(f"/v1/journeys/{unknown.json()['key']}/publish")
    assert refused.status_code == 422 and "no segment with key 'no-such-segment'" in refused.text

    key = await journey(
        time_api,
        [{"id": "nurture", "type": "wait", "duration": "30d"}],
        trigger={"segment": trial},
        exit_when={"segment": customers},
    )
    person = await contact(time_api)
    await time_api.post(
        "/v1/contacts", json={"email": person["email"], "attributes": {"plan": plan}}
    )
    [run] = await enrollments_of(settings, key)
    assert str(run.contact_id) == person["id"]
    await wait_for_step(time_api, str(run.id), "nurture")
    await time_api.post(
        "/v1/contacts", json={"email": person["email"], "lifecycle_stage": "customer"}
    )
    result = await result_of(time_env, run.workflow_id)
    assert result.status == "exited"
    [run] = await enrollments_of(settings, key)
    assert run.goal is not None and "contact profile" in run.goal

    # wait_for the segment_entered event of one segment.
    waiting = await journey(
        time_api,
        [
            {
                "id": "until-trial",
                "type": "wait_for",
                "event": "segment_entered",
                "where": {"prop": "segment", "value": trial},
                "timeout": "7d",
                "on_event": "done",
                "on_timeout": "done",
            },
            {"id": "done", "type": "exit"},
        ],
    )
    other = await contact(time_api)
    enrolled = (await enroll(time_api, waiting, other["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "until-trial")
    await time_api.post(
        "/v1/contacts", json={"email": other["email"], "attributes": {"plan": plan}}
    )
    await result_of(time_env, enrolled["workflow_id"])
    view = (await time_api.get(f"/v1/enrollments/{enrolled['id']}")).json()
    record = next(h for h in view["history"] if h["step_id"] == "until-trial")
    assert "segment_entered" in record["outcome"], view["history"]


async def test_segment_members_of_concurrent_refreshes_enter_once(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    plan = unique("plan")
    key = unique("seg")
    await put_segment(time_api, key, {"attr": "plan", "value": plan})
    person = await contact(time_api)
    # Ten racing updates of the same contact: one membership, one segment_entered event.
    await asyncio.gather(
        *(
            time_api.post(
                "/v1/contacts",
                json={"email": person["email"], "attributes": {"plan": plan, "n": n}},
            )
            for n in range(10)
        )
    )
    assert await members(time_api, key) == {person["id"]}
    assert await segment_events(settings, person["id"]) == [("segment_entered", key)]
    async with session_scope(settings.database_url) as session:
        rows = (
            await session.exec(
                select(func.count()).where(SegmentMember.contact_id == uuid.UUID(person["id"]))
            )
        ).one()
    assert rows >= 1


async def test_scheduled_refresh_catches_time_based_segments(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, dev_worker: Worker, settings: Settings
) -> None:
    seen = unique("seen")
    key = unique("quiet")
    person = await contact(dev_api)
    await track(dev_api, person["id"], seen)
    # "No activity in the last 2 seconds": true later without anything happening.
    await put_segment(
        dev_api, key, {"all": [{"attr": "email", "value": person["email"]},
                               {"not": {"event": seen, "within": "2s"}}]}
    )  # fmt: skip
    assert await members(dev_api, key) == set()
    await ensure_audience_schedule(dev_env.client, settings)
    schedule = dev_env.client.get_schedule_handle(SCHEDULE_ID)
    try:
        hourly = settings.model_copy(update={"audience_refresh_every": "1h"})
        await ensure_audience_schedule(dev_env.client, hourly)
        described = await schedule.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(hours=1)]
        await asyncio.sleep(2.5)
        assert await members(dev_api, key) == set()
        await schedule.trigger()
        deadline = asyncio.get_running_loop().time() + 30
        while await members(dev_api, key) != {person["id"]}:
            assert asyncio.get_running_loop().time() < deadline, "the refresh never ran"
            await asyncio.sleep(0.2)
        assert await segment_events(settings, person["id"]) == [("segment_entered", key)]
    finally:
        await schedule.delete()
