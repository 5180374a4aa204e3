"""Events and contact changes reach only the running journeys whose version reads them:
nothing is signalled for an event no journey of the contact waits on, counts or exits on
(each signal is a billable Temporal action), and listening journeys still get theirs."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.journey import parse_journey
from models.listening import listening_of
from tests.helpers import EXAMPLES, contact, enroll, publish, put_template, unique


def _journey(key: str, **fields: Any) -> dict[str, Any]:
    return {"key": key, "name": key, **fields}


async def _signals(env: WorkflowEnvironment, workflow_id: str) -> list[str]:
    history = await env.client.get_workflow_handle(workflow_id).fetch_history()
    return [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


async def _event(api: httpx.AsyncClient, contact_id: str, name: str, **props: Any) -> int:
    body = {"id": uuid.uuid4().hex, "contact_id": contact_id, "name": name, "properties": props}
    response = await api.post("/v1/events", json=body)
    assert response.status_code in (200, 201, 202), response.text
    return int(response.json()["delivered_to"])


async def test_event_reaches_only_journeys_that_read_it(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    await put_template(time_api, "routing-hello")
    send = {"id": "hello", "type": "email", "template": "routing-hello"}
    waits = _journey(
        unique("waits-open"),
        steps=[{"id": "opened", "type": "wait_for", "event": "email_opened", "timeout": "3d"}],
    )
    counts = _journey(
        unique("counts-buys"),
        exit_when={"event": "purchase_completed", "count_gte": 2},
        steps=[{"id": "pause", "type": "wait", "duration": "30d"}],
    )
    deaf = _journey(unique("deaf"), steps=[{"id": "pause", "type": "wait", "duration": "30d"}])
    windowed = _journey(
        unique("windowed"),
        steps=[
            {"id": "pause", "type": "wait", "duration": "30d"},
            {**send, "window": {"from": "09:00", "to": "17:00"}},
        ],
    )
    person = await contact(time_api)
    runs = {}
    for document in (waits, counts, deaf, windowed):
        await publish(time_api, document)
        runs[document["key"]] = (await enroll(time_api, document["key"], person["id"]))[
            "enrollment"
        ]["workflow_id"]

    assert await _event(time_api, person["id"], "page_viewed", page="/pricing") == 0
    for workflow_id in runs.values():
        assert await _signals(time_env, workflow_id) == []

    assert await _event(time_api, person["id"], "email_opened") == 1
    assert await _event(time_api, person["id"], "purchase_completed") == 1
    assert await _signals(time_env, runs[waits["key"]]) == ["event"]
    assert await _signals(time_env, runs[counts["key"]]) == ["event"]
    assert await _signals(time_env, runs[deaf["key"]]) == []
    assert await _signals(time_env, runs[windowed["key"]]) == []

    # A profile change reaches the journey judging a window in the contact's zone only.
    response = await time_api.patch(
        f"/v1/contacts/{person['id']}", json={"timezone": "Europe/Paris"}
    )
    assert response.status_code == 200, response.text
    assert await _signals(time_env, runs[windowed["key"]]) == ["contact_changed"]
    assert await _signals(time_env, runs[deaf["key"]]) == []
    assert await _signals(time_env, runs[waits["key"]]) == ["event"]


def _example(name: str) -> Any:
    return parse_journey(yaml.safe_load((EXAMPLES / "journeys" / f"{name}.yaml").read_text()))


def test_shipped_journeys_listen_to_what_their_steps_and_goals_read() -> None:
    cart = listening_of(_example("abandoned-cart"))
    assert cart.hears("order_completed") and not cart.hears("page_viewed")
    assert cart.contact_changes  # the SMS window is judged in the contact's zone
    invitation = listening_of(_example("event-invitation"))
    assert invitation.events == {
        "event_registered",
        "event_attended",
        "event_registration_cancelled",
        "event_cancelled",
    }
    handoff = listening_of(_example("sales-handoff"))
    assert handoff.events == set() and not handoff.contact_changes
    welcome = listening_of(_example("welcome-series"))
    assert welcome.contact_changes and welcome.events == set()  # exit_when on the stage
    everything = listening_of(
        parse_journey(
            _journey(
                "any",
                exit_when={"prop": "plan", "value": "pro"},
                steps=[{"id": "x", "type": "exit"}],
            )
        )
    )
    assert everything.hears("anything at all") and not everything.segments
    goal = {"segment": "customers"}
    by_segment = listening_of(
        parse_journey(_journey("seg", exit_when=goal, steps=[{"id": "x", "type": "exit"}]))
    )
    assert by_segment.segments and by_segment.contact_changes  # segments change with profiles
