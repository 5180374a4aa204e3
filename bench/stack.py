"""What a benchmark runs on, started afresh and stopped after: a scratch PostgreSQL database,
a Temporal dev server, the Nurture worker and API as their own processes (as in production),
and a worker process for the hand-written baseline on the same server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from devstack.postgres import create_database, drop_database, migrate, start_embedded, stop_embedded
from models.contracts import SEARCH_ATTRIBUTES

PROJECT_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_KEY = "bench-api-key"
NURTURE_QUEUE = "bench-nurture"
BASELINE_QUEUE = "bench-baseline"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The process and every process under it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU used by a process and its live descendants (a uvicorn master and its workers)."""
    total = 0.0
    for each in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):  # ended meanwhile
            total += cpu_seconds(each)
    return total


def temporal_server_pid() -> int:
    """The dev server this process started (its child running ``server start-dev``)."""
    for pid in descendants(os.getpid())[1:]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"start-dev" in command:
            return pid
    raise RuntimeError("no Temporal dev server among this process's children")


async def settle(pids: list[int], idle_share: float = 0.05, most_seconds: float = 120) -> None:
    """Wait until these processes are idle (each under ``idle_share`` of a CPU for a second):
    work a phase queued (first workflow tasks, sends) must not be charged to the next."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + most_seconds
    while loop.time() < deadline:
        before = [cpu_seconds(pid) for pid in pids]
        await asyncio.sleep(1)
        if all(cpu_seconds(p) - b < idle_share for p, b in zip(pids, before, strict=True)):
            return


@dataclass
class Stack:
    database_url: str
    client: Client
    api: httpx.AsyncClient
    hooks: httpx.AsyncClient
    worker: subprocess.Popen[bytes]
    baseline_worker: subprocess.Popen[bytes]
    sendgrid_key: ec.EllipticCurvePrivateKey

    api_pid: int = 0
    server_pid: int = 0

    async def settle(self) -> None:
        await settle([self.worker.pid, self.baseline_worker.pid])

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the stack (and by this one)."""
        return {
            "temporal_server": cpu_seconds(self.server_pid),
            "nurture_api": tree_cpu_seconds(self.api_pid),
            "nurture_worker": cpu_seconds(self.worker.pid),
            "baseline_worker": cpu_seconds(self.baseline_worker.pid),
            "bench_client": cpu_seconds(os.getpid()),
        }


@asynccontextmanager
async def scratch_database(keep: bool = False) -> AsyncIterator[str]:
    """A migrated database of its own on ``DATABASE_URL``'s server, else on an embedded one
    (stopped after); dropped after unless ``keep``."""
    server_url = os.environ.get("DATABASE_URL")
    embedded = None
    if not server_url:
        embedded = Path(tempfile.mkdtemp(prefix="nurture-bench-")) / "pg"
        server_url = start_embedded(embedded)
    name = f"nurture_bench_{uuid.uuid4().hex[:8]}"
    database_url = create_database(server_url, name, exist_ok=False)
    try:
        migrate(database_url)
        yield database_url
    finally:
        from models.db import get_engine

        await get_engine(database_url).dispose()
        get_engine.cache_clear()
        if keep:
            print(f"kept {database_url}")
        else:
            drop_database(server_url, name)
        if embedded is not None and not keep:
            stop_embedded(embedded)


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(int(seconds * 10)):
            if proc.poll() is not None:
                raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
            try:
                if (await http.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {seconds} s")


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=PROJECT_DIR, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def running_stack(
    database_url: str, data_dir: Path, api_workers: int = 1
) -> AsyncIterator[Stack]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_log_level="error",
    )
    address = env.client.service_client.config.target_host
    port = free_port()
    proc_env = {
        **os.environ,
        "NURTURE_DATABASE_URL": database_url,
        "NURTURE_TEMPORAL_ADDRESS": address,
        "NURTURE_TASK_QUEUE": NURTURE_QUEUE,
        "NURTURE_API_KEY": API_KEY,
        "NURTURE_DATA_DIR": str(data_dir),
        "NURTURE_SENDGRID_WEBHOOK_PUBLIC_KEY": public,
        "NURTURE_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    worker = _spawn([sys.executable, "worker.py"], proc_env)
    baseline = _spawn(
        [sys.executable, "-m", "bench.baseline_worker", address, BASELINE_QUEUE], proc_env
    )
    api_proc = _spawn(
        [
            sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--no-access-log",
            "--workers", str(api_workers),
        ],
        proc_env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    try:
        await _wait_healthy(f"{base}/healthz", api_proc)
        async with (
            httpx.AsyncClient(
                base_url=base,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=120,
                limits=limits,
            ) as api,
            httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as hooks,
        ):
            yield Stack(
                database_url, env.client, api, hooks, worker, baseline, key,
                api_pid=api_proc.pid, server_pid=temporal_server_pid(),
            )  # fmt: skip
    finally:
        for proc in (api_proc, worker, baseline):
            _stop(proc)
        await env.shutdown()
