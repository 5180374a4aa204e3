"""Live figures on a dev server, each beside the raw-client baseline on the same server:
enrollment rate, worker memory per active journey, event -> action latency at a steady
rate, and SendGrid batch ingestion end to end.

Nurture's side: contacts enrolled through ``POST /v1/journeys/{key}/enrollments`` in a
journey that waits for ``email_opened`` and then sends an email. The baseline: the minimal
hand-written workflow (bench/minimal.py) started and signalled with the raw client, waiting
for the same signal and then running one activity.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

from bench.minimal import END, MinimalInput, MinimalJourneyWorkflow, act, wait
from bench.stack import BASELINE_QUEUE, Stack, rss_bytes
from models.db import session_scope

T = TypeVar("T")
JOURNEY = {
    "key": "bench-open",
    "name": "Bench: thank on open",
    "steps": [
        {
            "id": "opened",
            "type": "wait_for",
            "event": "email_opened",
            "timeout": "30d",
            "on_event": "thanks",
            "on_timeout": "done",
        },
        {"id": "thanks", "type": "email", "template": "bench-thanks"},
        {"id": "done", "type": "exit"},
    ],
}
PLAN = MinimalInput([wait("email_opened", days=30), act("email thanks"), END])


class CpuTally:
    """CPU each process of the stack used inside ``with`` blocks, summed over them."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.used: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def __enter__(self) -> CpuTally:
        self._at = self.stack.cpu()
        return self

    def __exit__(self, *_: object) -> None:
        for name, seconds in self.stack.cpu().items():
            self.used[name] = self.used.get(name, 0.0) + seconds - self._at[name]

    def per_item_ms(self, items: int) -> dict[str, float]:
        shares = {name: round(1000 * s / items, 2) for name, s in self.used.items()}
        shares["total"] = round(1000 * sum(self.used.values()) / items, 2)
        return shares


@dataclass
class Side:
    """One side's runs (Nurture's or the baseline's), by contact email."""

    workflow_ids: dict[str, str] = field(default_factory=dict)


async def concurrently(
    items: Sequence[T], work: Callable[[T], Awaitable[Any]], concurrency: int
) -> float:
    """Run ``work`` on every item, ``concurrency`` at a time; return the seconds it took."""
    queue = list(reversed(items))

    async def lane() -> None:
        while queue:
            await work(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started


async def prepare(stack: Stack, contacts: int) -> list[tuple[str, str]]:
    """The bench journey and template published, ``contacts`` contacts imported; returns
    (contact id, email) pairs."""
    body = {"channel": "email", "subject": "Thanks {{ contact.first_name }}", "html": "<p>Hi</p>"}
    (await stack.api.put("/v1/templates/bench-thanks", json=body)).raise_for_status()
    (await stack.api.post("/v1/journeys", json=JOURNEY)).raise_for_status()
    (await stack.api.post(f"/v1/journeys/{JOURNEY['key']}/publish")).raise_for_status()
    rows = [{"email": f"c{i}-{uuid.uuid4().hex[:6]}@bench.example"} for i in range(contacts)]
    response = await stack.api.post("/v1/contacts/import", json=rows)
    response.raise_for_status()
    async with session_scope(stack.database_url) as session:
        result = await (await session.connection()).execute(
            sa.text("SELECT id::text, email FROM contacts WHERE email LIKE '%@bench.example'")
        )
        return [(row[0], row[1]) for row in result.all()]


async def enrollment(
    stack: Stack, people: list[tuple[str, str]], concurrency: int
) -> tuple[dict[str, Any], Side, Side]:
    """Enroll everyone through the API, and start as many minimal workflows raw."""
    nurture, baseline = Side(), Side()
    rss_before = (rss_bytes(stack.worker.pid), rss_bytes(stack.baseline_worker.pid))

    async def enroll(person: tuple[str, str]) -> None:
        response = await stack.api.post(
            f"/v1/journeys/{JOURNEY['key']}/enrollments", json={"contact_id": person[0]}
        )
        response.raise_for_status()
        nurture.workflow_ids[person[1]] = response.json()["enrollment"]["workflow_id"]

    async def start(person: tuple[str, str]) -> None:
        workflow_id = f"baseline/{person[0]}"
        await stack.client.start_workflow(
            MinimalJourneyWorkflow.run, PLAN, id=workflow_id, task_queue=BASELINE_QUEUE
        )
        baseline.workflow_ids[person[1]] = workflow_id

    # In alternating rounds, so that the shared machine's load drifts over both alike; each
    # round waits for the workers to go idle, so neither side's first workflow tasks run in
    # the other's timed window. CPU is counted until then: the whole start, on every process.
    raw_s = api_s = 0.0
    cpu = {"raw": CpuTally(stack), "nurture": CpuTally(stack)}
    rounds = 4
    for r in range(rounds):
        part = people[r::rounds]
        with cpu["raw"]:
            raw_s += await concurrently(part, start, concurrency)
            await stack.settle()
        with cpu["nurture"]:
            api_s += await concurrently(part, enroll, concurrency)
            await stack.settle()
    rss_after = (rss_bytes(stack.worker.pid), rss_bytes(stack.baseline_worker.pid))
    n = len(people)
    return (
        {
            "contacts": n,
            "concurrency": concurrency,
            "nurture_per_s": round(n / api_s, 1),
            "raw_per_s": round(n / raw_s, 1),
            "ratio": round(raw_s / api_s, 2),
            "worker_kib_per_journey": round((rss_after[0] - rss_before[0]) / n / 1024, 1),
            "baseline_kib_per_workflow": round((rss_after[1] - rss_before[1]) / n / 1024, 1),
            "cpu_ms_per_contact": {side: tally.per_item_ms(n) for side, tally in cpu.items()},
        },
        nurture,
        baseline,
    )


def _signal_to_activity(history: WorkflowHistory) -> float:
    """Server time from the (first) signal to the start of the next activity, in seconds."""
    signalled = None
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signalled = signalled or event.event_time.ToDatetime().timestamp()
        if signalled and event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            return event.event_time.ToDatetime().timestamp()
    raise RuntimeError("no activity after the signal")


async def _wait_closed(stack: Stack, workflow_ids: Sequence[str], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    for workflow_id in workflow_ids:
        handle = stack.client.get_workflow_handle(workflow_id)
        remaining = deadline - time.monotonic()
        await asyncio.wait_for(handle.result(), max(remaining, 1))


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return statistics.median(values), p95


async def latency(
    stack: Stack, emails: list[str], nurture: Side, baseline: Side, rate: float
) -> dict[str, Any]:
    """Events at a steady ``rate`` per second, to Nurture and the baseline at once; the time
    from sending each to the start of the activity it causes (the email for Nurture, the
    activity for the baseline)."""
    contact_of = await _contact_ids(stack, emails)

    async def post_event(email: str) -> None:
        body = {"id": uuid.uuid4().hex, "contact_id": contact_of[email], "name": "email_opened"}
        (await stack.api.post("/v1/events", json=body)).raise_for_status()

    async def raw_signal(email: str) -> None:
        handle = stack.client.get_workflow_handle(baseline.workflow_ids[email])
        await handle.signal(MinimalJourneyWorkflow.event, "email_opened")

    sides = (("raw", baseline, raw_signal), ("nurture", nurture, post_event))
    sent: dict[str, dict[str, float]] = {"raw": {}, "nurture": {}}

    async def one(name: str, send: Callable[[str], Awaitable[None]], email: str) -> None:
        sent[name][email] = time.time()
        await send(email)

    # Both streams at once, tick by tick: the shared machine's noise falls on both alike.
    tasks = []
    begin = time.monotonic()
    for i, email in enumerate(emails):
        delay = begin + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks += [asyncio.create_task(one(name, send, email)) for name, _, send in sides]
    await asyncio.gather(*tasks)
    figures: dict[str, Any] = {"events": len(emails), "rate_per_s": rate}
    for name, side, _ in sides:
        ids = [side.workflow_ids[e] for e in emails]
        await _wait_closed(stack, ids)
        delays = []
        for email, workflow_id in zip(emails, ids, strict=True):
            history = await stack.client.get_workflow_handle(workflow_id).fetch_history()
            delays.append((_signal_to_activity(history) - sent[name][email]) * 1000)
        p50, p95 = _percentiles(delays)
        figures[f"{name}_p50_ms"], figures[f"{name}_p95_ms"] = round(p50, 1), round(p95, 1)
    await stack.settle()
    figures["p50_ratio"] = round(figures["nurture_p50_ms"] / figures["raw_p50_ms"], 2)
    figures["p95_ratio"] = round(figures["nurture_p95_ms"] / figures["raw_p95_ms"], 2)
    return figures


async def _contact_ids(stack: Stack, emails: list[str]) -> dict[str, str]:
    async with session_scope(stack.database_url) as session:
        result = await (await session.connection()).execute(
            sa.text("SELECT email, id::text FROM contacts WHERE email = ANY(:emails)"),
            {"emails": emails},
        )
        return {row[0]: row[1] for row in result.all()}


def _signed(key: ec.EllipticCurvePrivateKey, body: bytes) -> dict[str, str]:
    import base64

    timestamp = str(int(time.time()))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


async def ingestion(
    stack: Stack,
    emails: list[str],
    nurture: Side,
    baseline: Side,
    batch: int,
    concurrency: int,
) -> dict[str, Any]:
    """SendGrid ``open`` events in signed batches through the webhook, until every awaiting
    journey has acted and ended; beside raw signals to as many waiting minimal workflows."""
    raw_ids = [baseline.workflow_ids[e] for e in emails]

    async def raw_signal(workflow_id: str) -> None:
        handle = stack.client.get_workflow_handle(workflow_id)
        await handle.signal(MinimalJourneyWorkflow.event, "email_opened")

    cpu = {"raw": CpuTally(stack), "nurture": CpuTally(stack)}
    with cpu["raw"]:
        started = time.perf_counter()
        await concurrently(raw_ids, raw_signal, concurrency)
        await _wait_closed(stack, raw_ids)
        raw_s = time.perf_counter() - started
        await stack.settle()

    now = int(time.time())
    events = [
        {
            "email": email,
            "event": "open",
            "timestamp": now,
            "sg_event_id": uuid.uuid4().hex,
            "sg_message_id": f"bench.{i}",
        }
        for i, email in enumerate(emails)
    ]
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]

    async def post(events: list[dict[str, Any]]) -> None:
        body = json.dumps(events).encode()
        response = await stack.hooks.post(
            "/webhooks/sendgrid", content=body, headers=_signed(stack.sendgrid_key, body)
        )
        response.raise_for_status()

    with cpu["nurture"]:
        started = time.perf_counter()
        await concurrently(batches, post, min(concurrency, len(batches)))
        accepted_s = time.perf_counter() - started
        await _wait_closed(stack, [nurture.workflow_ids[e] for e in emails])
        api_s = time.perf_counter() - started
        await stack.settle()
    n = len(emails)
    return {
        "events": n,
        "batch": batch,
        "nurture_per_s": round(n / api_s, 1),
        "nurture_accepted_s": round(accepted_s, 2),
        "raw_per_s": round(n / raw_s, 1),
        "ratio": round(raw_s / api_s, 2),
        "cpu_ms_per_event": {side: tally.per_item_ms(n) for side, tally in cpu.items()},
    }


async def bulk_enrollment(
    stack: Stack, people: list[tuple[str, str]], concurrency: int
) -> dict[str, Any]:
    """The same contacts enrolled with one ``POST /v1/journeys/{key}/bulk-enrollments`` in a
    copy of the bench journey, from the request until the job reports every contact done
    (the workflow pages through them, starting journeys ``NURTURE_BULK_ENROLL_CONCURRENCY``
    at a time), beside as many minimal workflows started raw."""
    copy = {**JOURNEY, "key": f"{JOURNEY['key']}-bulk", "name": "Bench: bulk"}
    (await stack.api.post("/v1/journeys", json=copy)).raise_for_status()
    (await stack.api.post(f"/v1/journeys/{copy['key']}/publish")).raise_for_status()

    async def start(person: tuple[str, str]) -> None:
        await stack.client.start_workflow(
            MinimalJourneyWorkflow.run,
            PLAN,
            id=f"baseline-bulk/{person[0]}",
            task_queue=BASELINE_QUEUE,
        )

    cpu = {"raw": CpuTally(stack), "nurture": CpuTally(stack)}
    with cpu["raw"]:
        raw_s = await concurrently(people, start, concurrency)
        await stack.settle()
    cpu["nurture"].__enter__()
    started = time.perf_counter()
    response = await stack.api.post(
        f"/v1/journeys/{copy['key']}/bulk-enrollments",
        json={"contact_ids": [contact_id for contact_id, _ in people]},
    )
    response.raise_for_status()
    job = response.json()
    while job["status"] == "running":
        await asyncio.sleep(0.2)
        answer = await stack.api.get(f"/v1/bulk-enrollments/{job['id']}")
        answer.raise_for_status()
        job = answer.json()
    bulk_s = time.perf_counter() - started
    if job["status"] != "completed" or job["enrolled"] != len(people):
        raise RuntimeError(f"bulk enrollment ended {job['status']}: {job}")
    await stack.settle()
    cpu["nurture"].__exit__()
    n = len(people)
    return {
        "contacts": n,
        "nurture_per_s": round(n / bulk_s, 1),
        "raw_per_s": round(n / raw_s, 1),
        "ratio": round(raw_s / bulk_s, 2),
        "cpu_ms_per_contact": {side: tally.per_item_ms(n) for side, tally in cpu.items()},
    }
