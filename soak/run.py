"""The soak: contacts enrolled, events and form webhooks fired, all at once, while faults are
injected in turn (a worker SIGKILLed and replaced, Temporal restarted, a provider 500/429
storm, PostgreSQL restarted); then the books are checked.

Books that must balance: every event a sender got a 2xx for is stored once and signalled to
the contact's journey (counted in the workflow histories, not in our tables); every journey
sent its two emails, none accepted twice by the provider; every journey left on its goal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import col
from temporalio.api.enums.v1 import EventType

from api.main import create_app
from devstack.postgres import create_database, migrate, start_embedded, stop_embedded
from models.db import session_scope
from models.tables import Enrollment, Event, Journey, Message
from settings import Settings
from soak.stack import Books, FakeSendGrid, TemporalServer, WorkerProcess, read_books, worker_env

log = logging.getLogger("soak")
MESSAGES_PER_JOURNEY = 2
# Answers after which a sender tries again (as SDKs and webhook providers do).
RETRY_STATUSES = {429, 500, 502, 503, 504}


@dataclass
class SoakConfig:
    seconds: float = 30.0  # how long contacts and events keep coming
    contacts: int = 16
    events_per_second: float = 8.0
    fault_every_seconds: float = 6.0
    workers: int = 2
    work_dir: Path | None = None
    # After the faults: how long journeys may take to catch up. A send that failed many
    # times waits its retry policy's backoff (doubling up to 10 minutes).
    settle_seconds: float = 660.0


@dataclass
class SoakReport:
    faults: list[str] = field(default_factory=list)
    fault_kinds: Counter[str] = field(default_factory=Counter)
    accepted_events: set[str] = field(default_factory=set)  # idempotency ids answered 2xx
    stored_events: int = 0
    stored_not_accepted: int = 0  # stored rows no sender was told were accepted
    signalled_events: int = 0  # distinct (journey, event) signals seen in histories
    expected_signals: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    books: Books | None = None
    exited_on_goal: int = 0
    seconds: float = 0.0
    recovery_seconds: float = 0.0  # from the last fault to every journey's two emails

    def problems(self) -> list[str]:
        found = list(self.books.problems()) if self.books else ["no books"]
        if self.stored_events != len(self.accepted_events) or self.stored_not_accepted:
            found.append(
                f"events accepted {len(self.accepted_events)}, stored {self.stored_events}, "
                f"of which not accepted {self.stored_not_accepted}"
            )
        if self.signalled_events != self.expected_signals:
            found.append(
                f"events signalled {self.signalled_events} != expected {self.expected_signals}"
            )
        if self.books and self.exited_on_goal != self.books.enrollments:
            found.append(f"left on goal {self.exited_on_goal} of {self.books.enrollments}")
        return found

    def text(self) -> str:
        lines = [f"soak ran {self.seconds:.0f}s; faults injected:"]
        lines += [f"  - {fault}" for fault in self.faults]
        lines.append(
            f"events: accepted {len(self.accepted_events)}, stored {self.stored_events}, "
            f"signalled to listening journeys {self.signalled_events} "
            f"(expected {self.expected_signals})"
        )
        lines.append(f"sender retries by answer: {dict(self.retries)}")
        if self.books:
            lines.append(f"books: {self.books.summary()}")
        lines.append(f"journeys left on their goal: {self.exited_on_goal}")
        lines.append(f"recovered (all sent, all delivered) {self.recovery_seconds:.0f}s after load")
        problems = self.problems()
        lines.append("BOOKS BALANCE" if not problems else f"PROBLEMS: {problems}")
        return "\n".join(lines)


class Soak:
    def __init__(self, config: SoakConfig, work_dir: Path) -> None:
        self.config = config
        self.work_dir = work_dir
        self.report = SoakReport()
        # Not under pytest's temporary directory: a pytest starting meanwhile tightens its
        # permissions, and the embedded server runs as its own user.
        self.pg_root = Path(tempfile.mkdtemp(prefix="nurture-soak-pg-"))
        self.pg_dir = self.pg_root / "data"
        self.temporal = TemporalServer(work_dir / "temporal.db")
        # Slow enough that a killed worker often has sends in flight.
        self.provider = FakeSendGrid(latency=0.4)
        self.workers: list[WorkerProcess] = []
        self.contacts: list[str] = []
        self.enrolled: list[str] = []
        self.key = f"soak-{uuid.uuid4().hex[:6]}"
        self.settings: Settings
        self.api: httpx.AsyncClient

    async def run(self) -> SoakReport:
        started = time.monotonic()
        server_url = start_embedded(self.pg_dir)
        try:
            database_url = create_database(server_url, "nurture_soak")
            migrate(database_url)
            self.settings = Settings(
                database_url=database_url,
                data_dir=self.work_dir,
                api_key="soak-key",
                task_queue=f"soak-{uuid.uuid4().hex[:6]}",
            )
            client = await self.temporal.start()
            env = worker_env(self.settings, self.temporal.address, self.provider.url)
            for index in range(self.config.workers):
                self.workers.append(await WorkerProcess(f"w{index}", env, self.work_dir).start())
            app = create_app(self.settings, temporal=client)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://nurture.soak",
                headers={"Authorization": "Bearer soak-key"},
            ) as self.api:
                await self._setup_journey()
                await self._load_under_faults(env)
                await self._settle()
            self.report.seconds = time.monotonic() - started
            return self.report
        finally:
            for worker in self.workers:
                worker.kill()
            self.provider.close()
            await self.temporal.stop()
            from models.db import get_engine

            await get_engine(self.settings.database_url).dispose()
            stop_embedded(self.pg_dir)
            shutil.rmtree(self.pg_root, ignore_errors=True)

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the API as a sender that retries 429/5xx and broken connections."""
        for _ in range(600):
            try:
                response = await self.api.request(method, path, **kwargs)
            except (httpx.TransportError, OSError) as err:
                self.report.retries[type(err).__name__] += 1
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                self.report.retries[str(response.status_code)] += 1
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{method} {path} never succeeded")

    async def _setup_journey(self) -> None:
        response = await self._call(
            "PUT",
            "/v1/templates/soak-mail",
            json={"channel": "email", "subject": "Hi {{ contact.first_name }}", "html": "<p>x</p>"},
        )
        assert response.status_code in (200, 201), response.text
        document = {
            "key": self.key,
            "name": "Soak: two emails, leave when done",
            # It listens to the page views and form fills the load sends (conditions that
            # never hold), so each of them is signalled to it: journeys hear only the
            # events their document reads.
            "exit_when": {
                "any": [
                    {"event": "soak_done"},
                    {"event": "page_viewed", "where": {"prop": "page", "op": "eq", "value": "-"}},
                    {
                        "event": "form_submitted",
                        "where": {"prop": "form", "op": "eq", "value": "-"},
                    },
                ]
            },
            "steps": [
                {"id": "first", "type": "email", "template": "soak-mail"},
                {"id": "pause", "type": "wait", "duration": "3s"},
                {"id": "second", "type": "email", "template": "soak-mail"},
                {"id": "hold", "type": "wait", "duration": "30d"},
            ],
        }
        response = await self._call("POST", "/v1/journeys", json=document)
        assert response.status_code == 201, response.text
        response = await self._call("POST", f"/v1/journeys/{self.key}/publish")
        assert response.status_code == 201, response.text

    async def _load_under_faults(self, env: dict[str, str]) -> None:
        deadline = time.monotonic() + self.config.seconds
        await asyncio.gather(
            self._enroll_contacts(deadline),
            self._fire_events(deadline),
            self._inject_faults(deadline, env),
        )

    async def _enroll_contacts(self, deadline: float) -> None:
        # Spread over the first two thirds, so the last ones still meet faults.
        gap = self.config.seconds * 2 / 3 / self.config.contacts
        for index in range(self.config.contacts):
            response = await self._call(
                "POST",
                "/v1/contacts",
                json={"email": f"soak{index}-{uuid.uuid4().hex[:6]}@example.com"},
            )
            assert response.status_code in (200, 201), response.text
            contact_id = response.json()["contact"]["id"]
            self.contacts.append(contact_id)
            response = await self._call(
                "POST", f"/v1/journeys/{self.key}/enrollments", json={"contact_id": contact_id}
            )
            assert response.status_code in (200, 201), response.text
            self.enrolled.append(contact_id)
            await asyncio.sleep(max(0.0, min(gap, deadline - time.monotonic())))

    async def _fire_events(self, deadline: float) -> None:
        rng = random.Random(7)
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() < deadline:
            if self.enrolled:
                contact_id = rng.choice(self.enrolled)
                kind = rng.random()
                task = asyncio.create_task(self._one_event(contact_id, kind < 0.25))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / self.config.events_per_second)
        await asyncio.gather(*pending)

    async def _one_event(self, contact_id: str, as_form: bool) -> None:
        idempotency = uuid.uuid4().hex
        if as_form:
            email = await self._email_of(contact_id)
            response = await self._call(
                "POST",
                "/webhooks/forms/soak-demo",
                data={"email": email, "company": "Soak Ltd"},
                headers={"Idempotency-Key": idempotency},
            )
            accepted_id = f"form:soak-demo:{idempotency}"
        else:
            response = await self._call(
                "POST",
                "/v1/events",
                json={"contact_id": contact_id, "name": "page_viewed", "id": idempotency},
            )
            accepted_id = idempotency
        assert response.status_code in (200, 202), response.text
        self.report.accepted_events.add(accepted_id)

    async def _email_of(self, contact_id: str) -> str:
        response = await self._call("GET", f"/v1/contacts/{contact_id}")
        return str(response.json()["email"])

    async def _inject_faults(self, deadline: float, env: dict[str, str]) -> None:
        faults: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("SIGKILL a worker, start a new one", lambda: self._kill_worker(env)),
            ("restart PostgreSQL", self._restart_postgres),
            ("restart the Temporal dev server", self._restart_temporal),
            ("provider storm", self._storm),
        ]
        index = 0
        await asyncio.sleep(min(self.config.fault_every_seconds / 2, self.config.seconds / 4))
        while time.monotonic() < deadline:
            name, inject = faults[index % len(faults)]
            began = time.monotonic()
            detail = await inject()
            self.report.fault_kinds[name] += 1
            self.report.faults.append(
                f"{time.monotonic() - began:4.1f}s {name}: {detail}".replace("  ", " ")
            )
            log.info("fault: %s (%s)", name, detail)
            index += 1
            left = deadline - time.monotonic()
            await asyncio.sleep(max(0.0, min(self.config.fault_every_seconds, left)))

    async def _kill_worker(self, env: dict[str, str]) -> str:
        victim = self.workers.pop(0)
        in_flight = self.provider.in_flight
        victim.kill()
        name = f"w{len(self.report.faults) + self.config.workers}"
        replacement = WorkerProcess(name, env, self.work_dir)
        # Not waited for: the survivors carry the load while it starts.
        replacement.spawn()
        self.workers.append(replacement)
        return (
            f"killed {victim.name} with {in_flight} send(s) in flight at the provider, "
            f"started {replacement.name}"
        )

    async def _restart_temporal(self) -> str:
        await self.temporal.restart(down_seconds=2)
        return "down ~2s, same port and database file"

    async def _storm(self) -> str:
        self.provider.storm([500] * 5 + [429] * 5)
        return "next 10 Mail Send calls answered 500 x5 then 429 (Retry-After: 1) x5"

    async def _restart_postgres(self) -> str:
        stop_embedded(self.pg_dir)
        await asyncio.sleep(2)
        start_embedded(self.pg_dir)
        return "down ~2s"

    async def _settle(self) -> None:
        """Faults over: wait until every event is delivered and every journey sent its two
        emails, count the signals in the histories, then end every journey on its goal."""
        began = time.monotonic()
        limit = self.config.settle_seconds
        await self._wait(self._all_delivered, "every stored event delivered", limit)
        await self._wait(self._all_sent, "every journey sent its two emails", limit)
        self.report.recovery_seconds = time.monotonic() - began
        stored = await self._stored_ids()
        self.report.stored_events = len(stored)
        self.report.stored_not_accepted = len(stored - self.report.accepted_events)
        self.report.signalled_events, self.report.expected_signals = await self._signals()
        for contact_id in self.enrolled:
            response = await self._call(
                "POST",
                "/v1/events",
                json={"contact_id": contact_id, "name": "soak_done", "id": f"done-{contact_id}"},
            )
            assert response.status_code == 202, response.text
        await self._wait(self._all_exited, "every journey left on its goal", 120)
        self.report.books = await read_books(
            self.settings, self.provider, [self.key], MESSAGES_PER_JOURNEY
        )
        async with session_scope(self.settings.database_url) as session:
            self.report.exited_on_goal = len(
                (
                    await (await session.connection()).execute(
                        sa.select(col(Enrollment.id))
                        .join(Journey, col(Journey.id) == col(Enrollment.journey_id))
                        .where(col(Journey.key) == self.key)
                        .where(col(Enrollment.goal) == "exit_when met by event soak_done")
                    )
                ).all()
            )

    async def _wait(self, check: Callable[[], Awaitable[bool]], what: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"soak: not {what} within {seconds}s\n{await self._diagnose()}"
                )
            await asyncio.sleep(0.5)

    async def _diagnose(self) -> str:
        """What the journeys still running are doing: their pending activities, attempts
        and last failures, and the state of their messages."""
        lines = []
        async with session_scope(self.settings.database_url) as session:
            connection = await session.connection()
            runs = (
                await connection.execute(
                    sa.select(col(Enrollment.id), col(Enrollment.workflow_id))
                    .join(Journey, col(Journey.id) == col(Enrollment.journey_id))
                    .where(col(Journey.key) == self.key)
                    .where(col(Enrollment.status) == "active")
                )
            ).all()
            statuses = (
                await connection.execute(
                    sa.select(col(Message.enrollment_id), col(Message.step_id), col(Message.status))
                )
            ).all()
        by_run: dict[str, list[str]] = {}
        for enrollment_id, step, status in statuses:
            by_run.setdefault(str(enrollment_id), []).append(f"{step}={status}")
        assert self.temporal.env is not None
        for enrollment_id, workflow_id in runs:
            messages = by_run.get(str(enrollment_id), [])
            if len(messages) == MESSAGES_PER_JOURNEY and not any("pending" in m for m in messages):
                continue
            described = await self.temporal.env.client.get_workflow_handle(workflow_id).describe()
            pending = [
                f"{a.activity_type.name} attempt {a.attempt} state {a.state} "
                f"last failure {a.last_failure.message!r}"
                for a in described.raw_description.pending_activities
            ]
            lines.append(f"{workflow_id}: messages {messages}; pending {pending}")
        tails = "\n".join(f"--- {w.name}\n{w.log_tail(10)}" for w in self.workers)
        return "\n".join(lines[:20]) + "\n" + tails

    async def _scalar(self, statement: Any) -> int:
        async with session_scope(self.settings.database_url) as session:
            return int((await (await session.connection()).execute(statement)).scalar_one())

    def _soak_events(self) -> Any:
        return (
            sa.select(sa.func.count())
            .select_from(Event)
            .where(col(Event.source) != "derived")
            .where(col(Event.contact_id).in_([uuid.UUID(c) for c in self.contacts]))
        )

    async def _all_delivered(self) -> bool:
        return await self._scalar(self._soak_events().where(col(Event.delivered_at).is_(None))) == 0

    async def _stored_ids(self) -> set[str]:
        async with session_scope(self.settings.database_url) as session:
            rows = await (await session.connection()).execute(
                sa.select(col(Event.idempotency_id))
                .where(col(Event.source) != "derived")
                .where(col(Event.contact_id).in_([uuid.UUID(c) for c in self.contacts]))
            )
            return {str(value) for value in rows.scalars()}

    async def _all_sent(self) -> bool:
        books = await read_books(self.settings, self.provider, [self.key], MESSAGES_PER_JOURNEY)
        settled = books.messages_by_status["sent"] + books.messages_by_status["unconfirmed"]
        return settled == MESSAGES_PER_JOURNEY * len(self.enrolled)

    async def _all_exited(self) -> bool:
        books = await read_books(self.settings, self.provider, [self.key], MESSAGES_PER_JOURNEY)
        return books.by_status.get("active", 0) == 0 and books.enrollments == len(self.enrolled)

    async def _signals(self) -> tuple[int, int]:
        """(distinct stored events signalled to their contact's journey, as seen in the
        workflow histories; the number that should have been)."""
        async with session_scope(self.settings.database_url) as session:
            connection = await session.connection()
            runs = (
                await connection.execute(
                    sa.select(col(Enrollment.contact_id), col(Enrollment.workflow_id))
                    .join(Journey, col(Journey.id) == col(Enrollment.journey_id))
                    .where(col(Journey.key) == self.key)
                )
            ).all()
            events = (
                await connection.execute(
                    sa.select(col(Event.id), col(Event.contact_id))
                    .where(col(Event.source) != "derived")
                    .where(col(Event.contact_id).in_([uuid.UUID(c) for c in self.contacts]))
                )
            ).all()
        expected = {(str(c), str(e)) for e, c in events}
        assert self.temporal.env is not None
        client = self.temporal.env.client
        seen: set[tuple[str, str]] = set()
        for contact_id, workflow_id in runs:
            async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
                if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                    continue
                attributes = event.workflow_execution_signaled_event_attributes
                if attributes.signal_name != "event":
                    continue
                event_id = json.loads(attributes.input.payloads[0].data)["event_id"]
                seen.add((str(contact_id), event_id))
        return len(seen & expected), len(expected)


async def run_soak(config: SoakConfig) -> SoakReport:
    if config.work_dir is not None:
        config.work_dir.mkdir(parents=True, exist_ok=True)
        return await Soak(config, config.work_dir).run()
    with tempfile.TemporaryDirectory(prefix="nurture-soak-") as work:
        return await Soak(config, Path(work)).run()
