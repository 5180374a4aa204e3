"""Each shipped journey (examples/journeys) on one fixed path, and the hand-written minimal
plan for the same path: what a contact costs Temporal in Nurture and at the least.

Both run on the time-skipping server: the journey enrolled through the API, the minimal
started with the raw client; events are sent at the same skipped moment to both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bench.actions import RunCost, cost_of
from bench.minimal import (
    END,
    OFFICE,
    MinimalInput,
    MinimalJourneyWorkflow,
    Op,
    act,
    minimal_act,
    sleep,
    wait,
    window,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ACTIONS_TARGET = 1.2
PARIS = ZoneInfo("Europe/Paris")


def _nine_am(day: date) -> str:
    return datetime.combine(day, time(9), PARIS).astimezone(UTC).isoformat()


def _birthday(today: date) -> date:
    birthday = today + timedelta(days=10)
    return birthday + timedelta(days=1) if (birthday.month, birthday.day) == (2, 29) else birthday


@dataclass
class Scenario:
    name: str
    journey: str
    # The minimal plan, given today's date (for waits on calendar dates).
    plan: Callable[[date], list[Op]]
    contact: Callable[[date], dict[str, Any]] = lambda today: {}
    trigger: dict[str, Any] | None = None
    # (skipped time before it, event name) sent to both runs
    events: list[tuple[timedelta, str]] = field(default_factory=list)
    # A journey that never ends (a yearly loop) is measured until this many timers started.
    stop_after_timers: int | None = None


def _lesson(n: int) -> list[Op]:
    return [window("08:00", "10:30", OFFICE), act(f"email lesson {n}"), wait("lesson", days=3)]


SCENARIOS = [
    Scenario(
        "welcome-series",
        "welcome-series",
        lambda today: [
            act("email welcome"),
            sleep(days=2),
            act("email tips"),
            sleep(days=3),
            window("09:00", "17:00", OFFICE),
            act("email case study"),
            act("tag"),
            act("enroll in the course"),
            END,
        ],
    ),
    Scenario(
        "abandoned-cart-not-recovered",
        "abandoned-cart",
        lambda today: [
            sleep(hours=1),
            act("email reminder"),
            wait("order_completed", days=1),
            act("email last call"),
            act("read the contact for the phone"),
            wait("order_completed", days=2),
            act("tag"),
            END,
        ],
        trigger={"event": "cart_abandoned", "properties": {"cart_id": "c1", "items": []}},
    ),
    Scenario(
        "trial-nurture-never-opened",
        "trial-nurture",
        lambda today: [
            sleep(hours=10 / 3600),
            act("email offer"),
            wait("email_opened", seconds=120),
            act("email resend"),
            wait("email_opened", seconds=120),
            END,
        ],
    ),
    Scenario(
        "trial-nurture-opened",
        "trial-nurture",
        lambda today: [
            sleep(hours=10 / 3600),
            act("email offer"),
            wait("email_opened", seconds=120),
            act("read the contact's role"),
            act("email exec track"),
            END,
        ],
        contact=lambda today: {"attributes": {"role": "CMO"}},
        events=[(timedelta(seconds=30), "email_opened")],
    ),
    Scenario(
        "customer-education-no-lessons",
        "customer-education",
        lambda today: [
            *_lesson(1),
            *_lesson(2),
            *_lesson(3),
            *_lesson(4),
            *_lesson(5),
            act("read the contact for the sales check"),
            END,
        ],
    ),
    Scenario(
        "event-invitation-no-reply",
        "event-invitation",
        lambda today: [
            window("09:00", "17:00", OFFICE),
            act("email invite"),
            wait("registered", days=5),
            window("09:00", "17:00", OFFICE),
            act("email nudge"),
            wait("registered", days=2),
            act("tag"),
            END,
        ],
        trigger={
            "event": "event_invited",
            "properties": {"event_at": (datetime.now(UTC) + timedelta(days=40)).isoformat()},
        },
    ),
    Scenario(
        "re-engagement-sunset",
        "re-engagement",
        lambda today: [
            window("10:00", "14:00", ["tue", "wed", "thu"]),
            act("email miss you"),
            wait("engaged", days=7),
            window("10:00", "14:00", ["tue", "wed", "thu"]),
            act("email last chance"),
            wait("engaged", days=7),
            act("tag"),
            END,
        ],
    ),
    Scenario(
        "sales-handoff",
        "sales-handoff",
        lambda today: [act("tag"), act("crm task"), END],
    ),
    Scenario(
        "birthday-one-year",
        "birthday",
        lambda today: [
            Op("until", at=_nine_am(_birthday(today))),
            act("email greeting"),
            sleep(days=1),
            Op("until", at=_nine_am(_birthday(today).replace(year=_birthday(today).year + 1))),
        ],
        contact=lambda today: {
            "timezone": "Europe/Paris",
            "attributes": {"birthday": _birthday(today).replace(year=1992).isoformat()},
        },
        stop_after_timers=3,
    ),
]


def journey_documents(key: str, suffix: str) -> list[dict[str, Any]]:
    """The journey under a key of its own, after the journeys its ``enroll`` steps name
    (publishing checks they exist)."""
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / "journeys" / f"{key}.yaml").read_text())
    document["key"] = f"{key}-{suffix}"
    if document.get("trigger", {}).get("event"):
        document["trigger"]["event"] += f"-{suffix}"
    before = []
    for step in document["steps"]:
        if step["type"] == "enroll":
            before += journey_documents(step["journey"], suffix)
            step["journey"] += f"-{suffix}"
    return [*before, document]


async def load_templates(api: httpx.AsyncClient) -> None:
    for path in sorted((EXAMPLES / "templates").glob("*.yaml")):
        response = await api.put(
            f"/v1/templates/{path.stem}", json=yaml.safe_load(path.read_text())
        )
        response.raise_for_status()


async def _today(env: WorkflowEnvironment) -> date:
    return (await env.get_current_time()).astimezone(PARIS).date()


async def _closed_or_stopped(handle: WorkflowHandle[Any, Any], scenario: Scenario) -> bool:
    if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
        return True
    if scenario.stop_after_timers is None:
        return False
    history = await handle.fetch_history()
    timers = sum(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history.events)
    if timers < scenario.stop_after_timers:
        return False
    await handle.terminate("measured")
    return True


async def measure_pair(
    env: WorkflowEnvironment, api: httpx.AsyncClient, scenario: Scenario
) -> tuple[RunCost, RunCost]:
    """Run the scenario in Nurture (enrolled through the API; a Nurture worker must be
    polling) and as its minimal plan (raw client), side by side from the same moment of
    skipped time, so both see the same clock (windows, weekdays); return both costs."""
    await load_templates(api)
    for document in journey_documents(scenario.journey, uuid.uuid4().hex[:8]):
        (await api.post("/v1/journeys", json=document)).raise_for_status()
        (await api.post(f"/v1/journeys/{document['key']}/publish")).raise_for_status()
    today = await _today(env)
    body = {"email": f"bench-{uuid.uuid4().hex[:8]}@example.com", **scenario.contact(today)}
    person = (await api.post("/v1/contacts", json=body)).json()["contact"]
    task_queue = f"minimal-{uuid.uuid4().hex[:8]}"
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[MinimalJourneyWorkflow],
        activities=[minimal_act],
    ):
        response = await api.post(
            f"/v1/journeys/{document['key']}/enrollments",
            json={"contact_id": person["id"], "trigger": scenario.trigger},
        )
        response.raise_for_status()
        minimal = await env.client.start_workflow(
            MinimalJourneyWorkflow.run,
            MinimalInput(scenario.plan(today)),
            id=f"minimal/{scenario.name}/{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        workflow_id = response.json()["enrollment"]["workflow_id"]
        run_id = (await env.client.get_workflow_handle(workflow_id).describe()).run_id
        nurture = env.client.get_workflow_handle(workflow_id, run_id=run_id)
        for delay, name in scenario.events:
            await env.sleep(delay)
            event = {"id": uuid.uuid4().hex, "contact_id": person["id"], "name": name}
            (await api.post("/v1/events", json=event)).raise_for_status()
            await minimal.signal(MinimalJourneyWorkflow.event, name)
        pending = [nurture, minimal]
        async with asyncio.timeout(120):
            while pending:
                await env.sleep(timedelta(hours=6))
                pending = [h for h in pending if not await _closed_or_stopped(h, scenario)]
        return cost_of(await nurture.fetch_history()), cost_of(await minimal.fetch_history())
