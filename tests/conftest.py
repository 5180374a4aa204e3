"""Shared fixtures: real PostgreSQL, real Temporal (time-skipping and dev server), API client.

Servers are started once per session; each test gets its own task queue.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlmodel import col, select, update
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.main import create_app
from devstack.postgres import (
    create_database,
    drop_database,
    ensure_running,
    migrate,
    start_embedded,
    stop_embedded,
)
from devstack.temporal import register_search_attributes
from models.contracts import SEARCH_ATTRIBUTES
from models.db import session_scope
from models.tables import Enrollment, EnrollmentStatus
from settings import Settings
from worker import build_worker

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for this test session.

    On the server ``DATABASE_URL`` names when set (started if it is down), else on an
    embedded PostgreSQL in a temporary directory.
    """
    server_url = os.environ.get("DATABASE_URL")
    embedded_dir = None
    if server_url:
        ensure_running(server_url)
    else:
        embedded_dir = tmp_path_factory.mktemp("pg") / "data"
        server_url = start_embedded(embedded_dir)
    name = f"nurture_test_{uuid.uuid4().hex[:10]}"
    url = create_database(server_url, name, exist_ok=False)
    migrate(url)
    yield url
    from models.db import get_engine

    get_engine.cache_clear()
    drop_database(server_url, name)
    if embedded_dir is not None:
        stop_embedded(embedded_dir)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path,
        api_key="test-api-key",
        task_queue=f"tq-{uuid.uuid4().hex[:8]}",
        outbound_allow_private="127.0.0.1,::1",
    )


@pytest.fixture
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server: weeks of journey in seconds.

    One per test (it starts in about 0.2 s): its clock is global, and a run one test
    leaves behind could otherwise hold or race the clock of the next.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server")
    )
    await register_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real ``temporal server start-dev`` with Nurture's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
    )
    yield env
    await env.shutdown()


@pytest.fixture
async def time_worker(time_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Worker]:
    worker = build_worker(time_env.client, settings)
    async with worker:
        yield worker


@pytest.fixture
async def dev_worker(dev_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Worker]:
    worker = build_worker(dev_env.client, settings)
    async with worker:
        yield worker


@pytest.fixture
def dev_client(dev_env: WorkflowEnvironment) -> Client:
    return dev_env.client


def _api_client(app_settings: Settings, temporal: Client) -> httpx.AsyncClient:
    app = create_app(app_settings, temporal=temporal)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://nurture.test",
        headers={"Authorization": f"Bearer {app_settings.api_key}"},
    )


@pytest.fixture
async def time_api(
    time_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """The API, starting journeys on the time-skipping server.

    The server's clock is shared: journeys a test leaves running would make later tests
    skip to their timers, so they are terminated when the test ends.
    """
    async with _api_client(settings, time_env.client) as client:
        yield client
    await terminate_active_runs(time_env.client, settings)


async def terminate_active_runs(client: Client, settings: Settings) -> None:
    async with session_scope(settings.database_url) as session:
        rows = (
            await session.exec(
                select(Enrollment.workflow_id, Enrollment.run_id).where(
                    Enrollment.status == EnrollmentStatus.active
                )
            )
        ).all()
    for workflow_id, run_id in rows:
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(workflow_id, run_id=run_id).terminate("test ended")
    async with session_scope(settings.database_url) as session:
        await session.exec(
            update(Enrollment)
            .where(col(Enrollment.status) == EnrollmentStatus.active)
            .values(status=EnrollmentStatus.exited, exit_reason="test ended")
        )


@pytest.fixture
async def dev_api(
    dev_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """The API, starting journeys on the real dev server."""
    async with _api_client(settings, dev_env.client) as client:
        yield client
