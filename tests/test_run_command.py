"""End to end through the run command: embedded PostgreSQL, Temporal dev server, worker
process, API process, example journey; API -> dev server -> worker -> outbox."""

from __future__ import annotations

import base64
import email
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from settings import PROJECT_DIR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningNurture:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.api_port, self.temporal_port, self.ui_port = free_port(), free_port(), free_port()
        self.log = data_dir / "run.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("NURTURE_") and k != "DATABASE_URL"
        }
        self.env.update(
            NURTURE_DATA_DIR=str(data_dir),
            NURTURE_API_PORT=str(self.api_port),
            NURTURE_TEMPORAL_ADDRESS=f"127.0.0.1:{self.temporal_port}",
            NURTURE_TEMPORAL_UI_URL=f"http://127.0.0.1:{self.ui_port}",
            NURTURE_API_KEY="e2e-key",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devstack.run"],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while "Nurture is running" not in self.output():
            assert self.proc.poll() is None, f"run command exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"run command not up in 120s:\n{self.output()}"
            time.sleep(0.3)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.api_port}",
            headers={"X-API-Key": "e2e-key"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def nurture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNurture]:
    running = RunningNurture(tmp_path_factory.mktemp("run"))
    running.start()
    try:
        yield running
    finally:
        if running.proc is not None and running.proc.poll() is None:
            running.stop()


def poll(check: Any, what: str, seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_run_command_prints_where_to_look(nurture: RunningNurture) -> None:
    out = nurture.output()
    assert f"http://127.0.0.1:{nurture.api_port}/docs" in out
    assert f"http://127.0.0.1:{nurture.ui_port}/namespaces/default/workflows" in out
    assert "trial-nurture" in out
    with nurture.api() as api:
        assert api.get("/docs").status_code == 200
        loaded = {j["key"]: j for j in api.get("/v1/journeys").json()}
        assert loaded["trial-nurture"]["status"] == "active"
        assert httpx.get(f"http://127.0.0.1:{nurture.ui_port}/", timeout=10).status_code == 200


def test_example_journey_end_to_end(nurture: RunningNurture) -> None:
    with nurture.api() as api:
        contact = api.post("/v1/contacts", json={
            "email": "grace@example.com", "attributes": {"first_name": "Grace", "role": "CMO"},
        }).json()["contact"]  # fmt: skip
        enrolled = api.post(
            "/v1/journeys/trial-nurture/enrollments", json={"email": "grace@example.com"}
        ).json()["enrollment"]

        def at_step(step: str) -> Any:
            body = api.get(f"/v1/enrollments/{enrolled['id']}").json()
            return body if body.get("current_step") == step else None

        poll(lambda: at_step("opened"), "the offer to be sent")
        accepted = api.post("/v1/events", json={
            "id": "open-grace-1", "email": "grace@example.com", "name": "email_opened",
        })  # fmt: skip
        assert accepted.status_code == 202 and accepted.json()["delivered_to"] == 1

        final = poll(
            lambda: (
                (b := api.get(f"/v1/enrollments/{enrolled['id']}").json())["status"] != "active"
                and b
            ),
            "the journey to end",
        )
    assert final["status"] == "exited"
    assert [h["step_id"] for h in final["history"]] == [
        "settle", "offer", "opened", "persona", "exec-track", "exec-done", "done",
    ]  # fmt: skip

    sent = sorted(
        (nurture.data_dir / "outbox" / "email").glob("*.eml"), key=lambda p: p.stat().st_mtime
    )
    subjects = [email.message_from_bytes(p.read_bytes())["Subject"] for p in sent]
    assert subjects == [
        "Grace, your 14-day Nurture trial is ready",
        "How marketing leaders at growing teams use Nurture",
    ]
    assert all(email.message_from_bytes(p.read_bytes())["To"] == "grace@example.com" for p in sent)

    # Findable in Temporal by journey and contact (what the UI's search runs).
    query = f"NurtureJourney = 'trial-nurture' AND NurtureContact = '{contact['id']}'"
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "temporal"), "workflow", "list",
         "--address", f"127.0.0.1:{nurture.temporal_port}", "--query", query, "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert enrolled["workflow_id"] in listed


def payload_bytes(history_json: str) -> bytes:
    """Every payload's data in a ``temporal workflow show -o json`` history (base64 there)."""
    found: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                found.append(base64.b64decode(node["data"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    return b"\n".join(found)


def test_run_command_encrypts_histories_and_the_ui_decodes_them(nurture: RunningNurture) -> None:
    """The run command keeps a payload key, the dev server's UI is pointed at the API's
    codec server, and a journey's history holds the contact's email only as ciphertext."""
    codec = f"http://127.0.0.1:{nurture.api_port}/codec/key/e2e-key"
    ui_settings = httpx.get(f"http://127.0.0.1:{nurture.ui_port}/api/v1/settings", timeout=10)
    assert ui_settings.json()["Codec"]["Endpoint"] == codec
    assert (nurture.data_dir / "payload_keys").read_text().startswith("dev1:")
    with nurture.api() as api:
        api.post("/v1/contacts", json={"email": "ida@example.com",
                                       "attributes": {"first_name": "Ida"}})  # fmt: skip
        enrolled = api.post(
            "/v1/journeys/trial-nurture/enrollments", json={"email": "ida@example.com"}
        ).json()["enrollment"]
        poll(
            lambda: (
                api.get(f"/v1/enrollments/{enrolled['id']}").json().get("current_step") == "opened"
            ),
            "the offer to be sent",
        )
        # The open carries a property into the workflow; the branch then reads the contact.
        opened = {"id": "open-ida-1", "email": "ida@example.com", "name": "email_opened",
                  "properties": {"by": "Ida T"}}  # fmt: skip
        api.post("/v1/events", json=opened)
        poll(
            lambda: api.get(f"/v1/enrollments/{enrolled['id']}").json()["status"] != "active",
            "the journey to end",
        )
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "temporal"), "workflow", "show",
         "--address", f"127.0.0.1:{nurture.temporal_port}", "-w", enrolled["workflow_id"],
         "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert b"ida@example.com" not in payload_bytes(shown) and b"Ida" not in payload_bytes(shown)
    decoded = subprocess.run(
        [str(Path(sys.executable).parent / "temporal"), "workflow", "show",
         "--address", f"127.0.0.1:{nurture.temporal_port}", "-w", enrolled["workflow_id"],
         "-o", "json", "--codec-endpoint", codec],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert b"ida@example.com" in payload_bytes(decoded) and b"Ida T" in payload_bytes(decoded)


def test_run_command_stops_everything_on_ctrl_c(nurture: RunningNurture) -> None:
    assert nurture.stop() == 0
    assert "nurture | stopped" in nurture.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{nurture.api_port}/healthz", timeout=2)
