"""The run command: Nurture on one machine with embedded defaults.

Starts PostgreSQL (embedded, unless NURTURE_DATABASE_URL names one), the Temporal dev
server with its UI (unless NURTURE_TEMPORAL_ADDRESS already answers), applies migrations,
starts the worker and the API, loads the example journeys, prints where to look, and
stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import httpx

from devstack.examples import load_examples
from devstack.postgres import create_database, migrate, start_embedded, stop_embedded
from devstack.temporal import cli_type
from models.codec import new_key
from models.contracts import SEARCH_ATTRIBUTES
from settings import PROJECT_DIR, Settings, generate_api_key

BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"nurture | {text}", flush=True)


def port_open(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    check: object, what: str, seconds: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}; see the log above")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {seconds:.0f}s")


def kept_secret(
    configured: str | None, path: Path, generate: Callable[[], str] = generate_api_key
) -> str:
    """The configured secret, else one generated once and kept in the data directory."""
    if configured:
        return configured
    if not path.exists():
        path.write_text(generate())
        path.chmod(0o600)
    return path.read_text().strip()


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.embedded_pg: Path | None = None

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, cwd=PROJECT_DIR, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def database(self) -> str:
        if self.settings.database_url:
            say("PostgreSQL: using NURTURE_DATABASE_URL")
            return self.settings.database_url
        self.embedded_pg = self.settings.data_dir / "pgdata"
        server = start_embedded(self.embedded_pg)
        say(f"PostgreSQL: embedded, data in {self.embedded_pg}")
        return create_database(server, "nurture")

    def temporal(self, env: dict[str, str], codec_endpoint: str | None = None) -> None:
        target = urlsplit("//" + self.settings.temporal_address)
        host, port = target.hostname or "127.0.0.1", target.port or 7233
        if port_open(host, port):
            say(f"Temporal: using the server at {host}:{port}")
            return
        ui = urlsplit(self.settings.temporal_ui_url)
        args = [
            str(BIN / "temporal"), "server", "start-dev",
            "--ip", host, "--port", str(port),
            "--ui-port", str(ui.port or 8233),
            "--db-filename", str(self.settings.data_dir / "temporal.sqlite"),
            "--namespace", self.settings.temporal_namespace,
            "--log-level", "warn",
        ]  # fmt: skip
        for key in SEARCH_ATTRIBUTES:
            args += ["--search-attribute", f"{key.name}={cli_type(key)}"]
        if codec_endpoint:
            # The UI decrypts payloads through the API's codec server (api/routes/codec.py).
            args += ["--ui-codec-endpoint", codec_endpoint]
        proc = self.spawn("temporal", args, env)
        wait_until(lambda: port_open(host, port), "the Temporal dev server", 60, proc)
        say(f"Temporal: dev server on {host}:{port}, UI on {self.settings.temporal_ui_url}")

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    say(f"{name} did not stop in 15s; killing it")
                    proc.kill()
                    proc.wait()
        if self.embedded_pg is not None:
            stop_embedded(self.embedded_pg)
        say("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-examples", action="store_true", help="do not load example journeys")
    args = parser.parse_args(argv)

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        api_key = kept_secret(settings.api_key, settings.data_dir / "api_key")
        webhook_secret = kept_secret(settings.webhook_secret, settings.data_dir / "webhook_secret")
        # Contact PII in workflow histories is encrypted (models/codec.py), as in production.
        payload_keys = kept_secret(
            settings.payload_keys, settings.data_dir / "payload_keys", lambda: new_key("dev1")
        )
        database_url = stack.database()
        migrate(database_url)
        say("database migrated")
        env = {
            **os.environ,
            "NURTURE_DATABASE_URL": database_url,
            "NURTURE_API_KEY": api_key,
            "NURTURE_WEBHOOK_SECRET": webhook_secret,
            "NURTURE_PAYLOAD_KEYS": payload_keys,
            "NURTURE_DATA_DIR": str(settings.data_dir),
        }
        base = f"http://{settings.api_host}:{settings.api_port}"
        # The dev server's UI cannot send an Authorization header: the key goes in the path
        # (the UI is local; whoever opens it is the operator the key belongs to).
        stack.temporal(env, f"{base}/codec/key/{api_key}")
        worker = stack.spawn("worker", [sys.executable, "worker.py"], env)
        api = stack.spawn(
            "api",
            [
                sys.executable, "-m", "uvicorn", "api.app:app",
                "--host", settings.api_host, "--port", str(settings.api_port),
                "--log-level", "warning",
            ],
            env,
        )  # fmt: skip

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, "the API", 60, api)
        if worker.poll() is not None:
            raise SystemExit("the worker exited; see the log above")
        loaded: list[str] = []
        if not args.no_examples:
            with httpx.Client(base_url=base, headers={"X-API-Key": api_key}, timeout=30) as client:
                loaded = load_examples(client)
        ui = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows"
        auth = f"-H 'X-API-Key: {api_key}' -H 'Content-Type: application/json'"
        contact = '{"email": "ada@example.com", "attributes": {"first_name": "Ada", "role": "CMO"}}'
        who = '{"email": "ada@example.com"}'
        banner = [
            "",
            "  Nurture is running.",
            f"  API docs        {base}/docs",
            f"  Dashboard       {base}/dashboard  (log in with the API key)",
            f"  Temporal UI     {ui}",
            f"  Outbox          {settings.outbox_path}",
            f"  API key         {api_key}",
            f"  Journeys        {', '.join(loaded) or '(none loaded)'}",
            "",
            "  Try it:",
            f"    curl -s {auth} \\",
            f"      -d '{contact}' {base}/v1/contacts",
            f"    curl -s {auth} \\",
            f"      -d '{who}' {base}/v1/journeys/trial-nurture/enrollments",
            "",
            "  Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(banner), flush=True)
        while not stopping:
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    say(f"{name} exited with code {proc.returncode}; stopping")
                    stopping = True
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
