"""A whole Nurture stack to break on purpose: a Temporal dev server that restarts on its own
port and database file, worker processes that can be SIGKILLed, a local provider playing
SendGrid's Mail Send that can hold requests or answer 500/429 storms, an embedded PostgreSQL
that restarts, and the books that say whether anything was lost or sent twice.

Used by the fault tests (tests/test_faults.py) and the soak (``python -m soak``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import col
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from models.contracts import SEARCH_ATTRIBUTES
from models.db import session_scope
from models.tables import Enrollment, Event, Journey, Message
from settings import PROJECT_DIR, Settings

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporalServer:
    """``temporal server start-dev`` on a port and database file of its own, stopped and
    started again as an operator restarting Temporal would."""

    def __init__(self, db_file: Path) -> None:
        self.db_file = db_file
        self.port = free_port()
        self.env: WorkflowEnvironment | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            env, self.env = self.env, None
            await env.shutdown()

    async def restart(self, down_seconds: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(down_seconds)
        await self.start()


class FakeSendGrid:
    """A local HTTP server playing SendGrid's Mail Send (for the real ``sendgrid`` SDK).

    It books every message it accepts by our ``nurture_message_id``. ``storm(answers)``
    makes the next requests fail with those statuses (429s carry ``Retry-After``);
    ``hold()`` keeps requests waiting (a send in flight) until ``release()``; ``latency``
    seconds pass before each message is accepted (a slow provider).
    """

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.accepted: Counter[str] = Counter()
        self.refused = 0
        self.in_flight = 0
        self._storm: list[int] = []
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake._lock:
                    failure = fake._storm.pop(0) if fake._storm else None
                    if failure is not None:
                        fake.refused += 1
                    else:
                        fake.in_flight += 1
                if failure is not None:
                    payload = json.dumps({"errors": [{"message": f"storm {failure}"}]}).encode()
                    self.send_response(failure)
                    if failure == 429:
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                fake._gate.wait(120)
                time.sleep(fake.latency)
                message_id = _message_id(json.loads(body))
                with fake._lock:
                    # Accepted once fully received, whether or not the sender hears back.
                    fake.accepted[message_id] += 1
                    fake.in_flight -= 1
                try:
                    self.send_response(202)
                    self.send_header("X-Message-Id", f"sg-{uuid.uuid4().hex[:12]}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender died while we held its request

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def storm(self, answers: list[int]) -> None:
        with self._lock:
            self._storm.extend(answers)

    def storm_left(self) -> int:
        with self._lock:
            return len(self._storm)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _message_id(mail: dict[str, Any]) -> str:
    args = dict(mail.get("custom_args") or {})
    for personalization in mail.get("personalizations", []):
        args.update(personalization.get("custom_args") or {})
    return str(args["nurture_message_id"])


def worker_env(settings: Settings, temporal_address: str, provider_url: str) -> dict[str, str]:
    """The environment a worker process reads its settings from (the ``NURTURE_`` ones)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NURTURE_")}
    env.update(
        {
            "NURTURE_DATABASE_URL": str(settings.database_url),
            "NURTURE_DATA_DIR": str(settings.data_dir),
            "NURTURE_API_KEY": settings.api_key or "soak-key",
            "NURTURE_TASK_QUEUE": settings.task_queue,
            "NURTURE_TEMPORAL_ADDRESS": temporal_address,
            "NURTURE_EMAIL_PROVIDER": "sendgrid",
            "NURTURE_SENDGRID_API_KEY": "SG.fault-test",
            "NURTURE_SENDGRID_BASE_URL": provider_url,
            "NURTURE_OUTBOUND_ALLOW_PRIVATE": "127.0.0.1,::1",
        }
    )
    return env


class WorkerProcess:
    """``python worker.py`` as its own process, so a SIGKILL is a real crash."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, ready_seconds: float = 60) -> WorkerProcess:
        """Start the process and wait until it polls the task queue."""
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + ready_seconds
        while b"worker polling" not in self.log_path.read_bytes()[start_offset:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name} not ready: {self.log_tail()}")
            await asyncio.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, in-flight work abandoned."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# Statuses of a message the provider took (later ones come from its webhooks).
WENT = frozenset({"sent", "delivered", "opened", "clicked", "bounced", "complained"})


@dataclass
class Books:
    """What the database and the provider say happened, and the rules they must obey."""

    enrollments: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    messages_by_status: Counter[str] = field(default_factory=Counter)
    accepted_by_provider: int = 0
    # Message ids the provider accepted more than once: must be empty.
    duplicates: dict[str, int] = field(default_factory=dict)
    # Rows marked sent that the provider never accepted: must be empty.
    sent_not_accepted: list[str] = field(default_factory=list)
    # Ids the provider accepted that no message row names: must be empty.
    unknown_accepted: list[str] = field(default_factory=list)
    # Journeys with other than the expected number of message rows.
    wrong_message_count: dict[str, int] = field(default_factory=dict)
    events_stored: int = 0
    events_undelivered: int = 0
    events_parked: int = 0

    def problems(self) -> list[str]:
        found = []
        if self.duplicates:
            found.append(f"sent twice: {self.duplicates}")
        if self.sent_not_accepted:
            found.append(f"marked sent, never accepted: {self.sent_not_accepted}")
        if self.unknown_accepted:
            found.append(f"accepted, no message row: {self.unknown_accepted}")
        if self.wrong_message_count:
            found.append(f"wrong message count: {self.wrong_message_count}")
        if self.events_undelivered or self.events_parked:
            found.append(
                f"events undelivered: {self.events_undelivered}, parked: {self.events_parked}"
            )
        return found

    def summary(self) -> str:
        return (
            f"enrollments {self.enrollments} {dict(self.by_status)}; "
            f"messages {self.messages} {dict(self.messages_by_status)}; "
            f"provider accepted {self.accepted_by_provider} (duplicates {len(self.duplicates)}); "
            f"events stored {self.events_stored}, undelivered {self.events_undelivered}, "
            f"parked {self.events_parked}"
        )


async def read_books(
    settings: Settings,
    provider: FakeSendGrid,
    journey_keys: list[str],
    messages_per_journey: int,
) -> Books:
    """The books of these journeys. Rules: each message id accepted at most once; a row
    marked sent was accepted exactly once; ``unconfirmed`` (a send cut off mid-flight: it
    may have gone, so it is never re-sent) was accepted at most once; each finished journey
    has exactly ``messages_per_journey`` rows; every stored event was delivered."""
    books = Books()
    async with session_scope(settings.database_url) as session:
        connection = await session.connection()
        ids = list(
            (
                await connection.execute(
                    sa.select(col(Journey.id)).where(col(Journey.key).in_(journey_keys))
                )
            ).scalars()
        )
        enrollments = (
            await connection.execute(
                sa.select(
                    col(Enrollment.id), col(Enrollment.status), col(Enrollment.contact_id)
                ).where(col(Enrollment.journey_id).in_(ids))
            )
        ).all()
        messages = (
            await connection.execute(
                sa.select(col(Message.id), col(Message.enrollment_id), col(Message.status)).where(
                    col(Message.journey_id).in_(ids)
                )
            )
        ).all()
        events = (
            await connection.execute(
                sa.select(col(Event.delivered_at), col(Event.delivery_parked_at))
                .where(col(Event.source) != "derived")
                .where(col(Event.contact_id).in_({c for _, _, c in enrollments}))
            )
        ).all()
    books.enrollments = len(enrollments)
    books.by_status = Counter(str(status) for _, status, _ in enrollments)
    books.messages = len(messages)
    books.messages_by_status = Counter(str(status) for _, _, status in messages)
    accepted = dict(provider.accepted)
    books.accepted_by_provider = sum(accepted.values())
    books.duplicates = {k: n for k, n in accepted.items() if n > 1}
    row_ids = {str(message_id) for message_id, _, _ in messages}
    books.unknown_accepted = sorted(set(accepted) - row_ids)
    books.sent_not_accepted = sorted(
        str(m) for m, _, status in messages if status in WENT and accepted.get(str(m)) != 1
    )
    per_enrollment = Counter(str(enrollment_id) for _, enrollment_id, _ in messages)
    for enrollment_id, status, _ in enrollments:
        count = per_enrollment.get(str(enrollment_id), 0)
        if status == "completed" and count != messages_per_journey:
            books.wrong_message_count[str(enrollment_id)] = count
    books.events_stored = len(events)
    books.events_undelivered = sum(1 for delivered, _ in events if delivered is None)
    books.events_parked = sum(1 for _, parked in events if parked is not None)
    return books
