"""The baseline: a minimal hand-written Temporal workflow doing a journey's waits and sends.

``MinimalJourneyWorkflow`` follows a plan written by hand for each shipped journey and path
(``PLANS``): a timer per wait, an activity per send, contact read, update, CRM task or
enrollment, a wait on a signal for each awaited event, and one activity recording the
outcome, as any application that keeps enrollments (re-entry, stats) must. Nothing else: no
search attributes beyond the start, no state query, no goals.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from models.schedule import Window, resolve_zone, window_opens_at


@dataclass
class Op:
    """One plan step: ``sleep`` (seconds), ``window`` (from, to, weekdays, zone: sleep until
    the window opens), ``until`` (an ISO moment), ``act`` (an activity), ``wait`` (a signal
    named ``name``, at most ``seconds``)."""

    kind: str
    name: str = ""
    seconds: float = 0
    window: dict[str, Any] = field(default_factory=dict)
    at: str = ""


@dataclass
class MinimalInput:
    ops: list[Op]


@activity.defn(name="minimal_act")
async def minimal_act(name: str) -> str:
    return name


@workflow.defn
class MinimalJourneyWorkflow:
    def __init__(self) -> None:
        self.received: list[str] = []

    @workflow.signal
    def event(self, name: str) -> None:
        self.received.append(name)

    @workflow.run
    async def run(self, input: MinimalInput) -> int:
        done = 0
        for op in input.ops:
            if op.kind == "sleep":
                await workflow.sleep(op.seconds)
            elif op.kind == "until":
                delay = datetime.fromisoformat(op.at) - workflow.now()
                if delay > timedelta(0):
                    await workflow.sleep(delay)
            elif op.kind == "window":
                zone, _ = resolve_zone(None, op.window["zone"])
                spec = Window.parse(op.window["from"], op.window["to"], op.window.get("weekdays"))
                opens = window_opens_at(workflow.now(), spec, zone)
                if opens > workflow.now():
                    await workflow.sleep(opens - workflow.now())
            elif op.kind == "act":
                await workflow.execute_activity(
                    minimal_act, op.name, start_to_close_timeout=timedelta(seconds=30)
                )
            elif op.kind == "wait":
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        lambda name=op.name: name in self.received,  # type: ignore[misc]
                        timeout=op.seconds or None,
                    )
            done += 1
        return done


def sleep(days: float = 0, hours: float = 0) -> Op:
    return Op("sleep", seconds=days * 86_400 + hours * 3_600)


def act(name: str) -> Op:
    return Op("act", name)


def wait(event: str, days: float = 0, seconds: float = 0) -> Op:
    return Op("wait", event, seconds=days * 86_400 + seconds)


def window(start: str, end: str, weekdays: list[str] | None = None) -> Op:
    zone = "America/New_York"
    return Op("window", window={"from": start, "to": end, "weekdays": weekdays, "zone": zone})


OFFICE = ["mon", "tue", "wed", "thu", "fri"]
END = act("record the outcome")
