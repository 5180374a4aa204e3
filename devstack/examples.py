"""Load the example templates and journeys through the REST API (idempotent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from settings import PROJECT_DIR

EXAMPLES = PROJECT_DIR / "examples"


def load_examples(api: httpx.Client, folder: Path = EXAMPLES) -> list[str]:
    """PUT every template, create or update every journey, publish changed ones; return keys."""
    for path in sorted((folder / "templates").glob("*.yaml")):
        response = api.put(f"/v1/templates/{path.stem}", json=yaml.safe_load(path.read_text()))
        response.raise_for_status()
    keys = []
    for path in sorted((folder / "journeys").glob("*.yaml")):
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        key = document["key"]
        existing = api.get(f"/v1/journeys/{key}")
        if existing.status_code == 404:
            api.post("/v1/journeys", json=document).raise_for_status()
        else:
            existing.raise_for_status()
            api.put(f"/v1/journeys/{key}", json=document).raise_for_status()
        journey = api.get(f"/v1/journeys/{key}").json()
        current = journey["current_version"]
        published = current and api.get(f"/v1/journeys/{key}/versions/{current}").json()
        if not published or published["document"] != journey["draft"]:
            api.post(f"/v1/journeys/{key}/publish").raise_for_status()
        keys.append(key)
    return keys
