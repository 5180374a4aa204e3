"""docker-compose.yml cannot run here (no Docker engine); these checks keep it in step
with the code: commands that exist, settings the code reads, search attributes it uses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from devstack.temporal import cli_type
from models.contracts import SEARCH_ATTRIBUTES
from settings import PROJECT_DIR, Settings

COMPOSE: dict[str, Any] = yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_every_component() -> None:
    assert set(SERVICES) >= {"postgresql", "temporal", "temporal-ui", "api", "worker", "migrate"}


def test_compose_commands_point_at_real_entry_points() -> None:
    assert SERVICES["api"]["command"][:2] == ["uvicorn", "api.app:app"]
    assert (PROJECT_DIR / "api" / "app.py").exists()
    assert SERVICES["worker"]["command"] == ["python", "worker.py"]
    assert SERVICES["migrate"]["command"] == ["alembic", "upgrade", "head"]
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    for needed in (
        "workflows",
        "activities",
        "api",
        "models",
        "migrations",
        "worker.py",
        "alembic.ini",
    ):
        assert needed in dockerfile


def test_compose_environment_names_real_settings() -> None:
    known = {f"NURTURE_{name.upper()}" for name in Settings.model_fields}
    for service in ("api", "worker", "migrate"):
        names = set(SERVICES[service]["environment"])
        assert names <= known, names - known
        assert "NURTURE_DATABASE_URL" in names and "NURTURE_TEMPORAL_ADDRESS" in names


def test_compose_registers_the_search_attributes_journeys_use() -> None:
    script = "\n".join(SERVICES["temporal-setup"]["command"])
    registered = set(re.findall(r"\b(Nurture[A-Za-z]+)=(\w+)", script))
    assert registered == {(key.name, cli_type(key)) for key in SEARCH_ATTRIBUTES}


def test_postgres_init_creates_the_app_database() -> None:
    init = Path(PROJECT_DIR / "deploy" / "postgres-init" / "01-nurture.sql").read_text()
    assert "CREATE DATABASE nurture" in init
    assert "/nurture" in SERVICES["api"]["environment"]["NURTURE_DATABASE_URL"]


README = (PROJECT_DIR / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    first_block = README.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["scripts/run.sh", "scripts/test.sh"]
    ci = (PROJECT_DIR / ".ci" / "run").read_text()
    assert "exec scripts/test.sh" in ci


def test_readme_lists_every_setting() -> None:
    for name in Settings.model_fields:
        assert f"`NURTURE_{name.upper()}`" in README, name
