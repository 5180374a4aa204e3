"""Load the example templates and journeys through the REST API (idempotent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from settings import PROJECT_DIR

EXAMPLES = PROJECT_DIR / "examples"


def load_examples(api: httpx.Client, folder: Path = EXAMPLES) -> list[str]:
    """PUT every template, segment and the scoring model, create or update every journey,
    publish changed ones; return the journey keys."""
    for path in sorted((folder / "templates").glob("*.yaml")):
        response = api.put(f"/v1/templates/{path.stem}", json=yaml.safe_load(path.read_text()))
        response.raise_for_status()
    load_segments(api, folder)
    scoring = folder / "scoring.yaml"
    if scoring.exists():
        api.put("/v1/scoring", json=yaml.safe_load(scoring.read_text())).raise_for_status()
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


def load_segments(api: httpx.Client, folder: Path = EXAMPLES) -> list[str]:
    """PUT every segment, those a segment names before it; return their keys in order."""
    pending = {p.stem: yaml.safe_load(p.read_text()) for p in (folder / "segments").glob("*.yaml")}
    loaded: list[str] = []
    while pending:
        ready = sorted(key for key, body in pending.items() if _named(body) <= set(loaded))
        if not ready:
            raise ValueError(f"segments name unknown or each other: {sorted(pending)}")
        for key in ready:
            api.put(f"/v1/segments/{key}", json=pending.pop(key)).raise_for_status()
            loaded.append(key)
    return loaded


def _named(value: Any) -> set[str]:
    """Segment keys a segment's condition names."""
    if isinstance(value, dict):
        found = {value["segment"]} if isinstance(value.get("segment"), str) else set()
        return found.union(*(_named(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_named(v) for v in value))
    return set()
