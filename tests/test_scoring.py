"""Lead scoring: rules with decay and caps, lifecycle thresholds, and the sales hand-off a
threshold crossing starts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.audience import refresh_audience
from models.db import session_scope
from models.scoring import ScoringModelDocument, stage_rank
from models.tables import Contact, CrmTask, Event, ScoringModel
from settings import Settings
from tests.helpers import contact, unique
from tests.test_journey_language import enrollments_of, journey
from tests.test_journey_workflow import result_of

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def restore_scoring(time_api: httpx.AsyncClient) -> AsyncIterator[None]:
    """The scoring model is shared by every contact: put back what the test replaced."""
    before = (await time_api.get("/v1/scoring")).json()["document"]
    yield
    response = await time_api.put("/v1/scoring", json=before)
    assert response.status_code == 200, response.text


async def _event(session: Any, contact_id: uuid.UUID, name: str, age: timedelta) -> None:
    session.add(
        Event(
            idempotency_id=uuid.uuid4().hex,
            contact_id=contact_id,
            name=name,
            properties={"page": "/pricing"},
            occurred_at=NOW - age,
            received_at=NOW,
        )
    )


async def test_scoring_rules_decay_cap_window_and_conditions(settings: Settings) -> None:
    decaying, capped, recent, other = (unique(n) for n in ("decay", "cap", "recent", "other"))
    document = ScoringModelDocument.model_validate(
        {
            "rules": [
                {"name": "decay", "event": decaying, "points": 10, "half_life": "10d"},
                {"name": "cap", "event": capped, "points": 5, "max_points": 12},
                {"name": "recent", "event": recent, "points": 3, "within": "7d"},
                {
                    "name": "pricing only",
                    "event": other,
                    "where": {"prop": "page", "value": "/blog"},
                    "points": 50,
                },
                {"name": "negative", "event": other, "points": -2},
                {"name": "cmo", "if": {"attr": "role", "value": "CMO"}, "points": 7},
            ],
            "thresholds": {"lead": 50, "mql": 130, "sql": 500},
        }
    )
    async with session_scope(settings.database_url) as session:
        person = Contact(
            email=f"{unique('s')}@example.com",
            attributes={"role": "CMO"},
            score_adjustment=100,
            score=100,
        )
        session.add(person)
        await session.merge(
            ScoringModel(key="default", document=document.model_dump(by_alias=True))
        )
        await session.flush()
        for age in (timedelta(0), timedelta(days=10), timedelta(days=20)):
            await _event(session, person.id, decaying, age)
        for _ in range(4):
            await _event(session, person.id, capped, timedelta(hours=1))
        await _event(session, person.id, recent, timedelta(days=1))
        await _event(session, person.id, recent, timedelta(days=8))
        await _event(session, person.id, other, timedelta(days=1))
        await session.flush()
        changes = await refresh_audience(session, now=NOW, contact_ids=[person.id])
        await session.refresh(person)
        # 100 + (10 + 5 + 2.5 -> 18) + min(20, 12) + 3 (one within 7d) + 0 (/blog only) - 2 + 7
        assert person.score == 100 + 18 + 12 + 3 - 2 + 7
        assert person.lifecycle_stage == "mql"
        [became] = [e for e in changes.derived_events if e.name.startswith("became_")]
        assert became.name == "became_mql"
        assert became.properties == {"from": "subscriber", "to": "mql", "score": 138}
        # Stages never move back: a lower score keeps the stage reached.
        person.score_adjustment = 0
        session.add(person)
        await session.flush()
        again = await refresh_audience(session, now=NOW, contact_ids=[person.id])
        await session.refresh(person)
        assert person.score == 38 and person.lifecycle_stage == "mql"
        assert not [e for e in again.derived_events if e.name.startswith("became_")]
        await session.rollback()


def test_scoring_documents_refuse_bad_rules() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"rules": [{"name": "x", "points": 1}]}, "give either event or if"),
        (
            {"rules": [{"name": "x", "event": "e", "if": {"attr": "a", "value": 1}, "points": 1}]},
            "give either event or if",
        ),
        ({"rules": [{"name": "x", "event": "e", "points": 1, "half_life": "soon"}]}, "duration"),
        (
            {
                "rules": [
                    {"name": "x", "if": {"attr": "a", "value": 1}, "points": 1, "within": "1d"}
                ]
            },
            "event rules only",
        ),
        ({"thresholds": {"vip": 10}}, "unknown lifecycle stage 'vip'"),
        ({"thresholds": {"lead": 50, "mql": 20}}, "must be above 'lead'"),
        (
            {"rules": [{"name": "x", "event": "e", "points": 1}] * 2},
            "rule name 'x' is used twice",
        ),
    ]
    for document, expected in bad:
        with pytest.raises(ValueError, match=expected):
            ScoringModelDocument.model_validate(document)
    assert stage_rank("mql") > stage_rank("lead") > stage_rank("custom-stage") == 0


async def test_score_threshold_crossing_starts_the_sales_handoff_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    restore_scoring: None,
) -> None:
    demo = unique("demo-requested")
    handoff = await journey(
        time_api,
        [
            {"id": "handoff", "type": "crm", "action": "create_task", "note": "Call this MQL"},
            {"id": "done", "type": "exit"},
        ],
        trigger={"event": "became_mql"},
    )
    bad = await time_api.put(
        "/v1/scoring", json={"rules": [{"name": "x", "points": 1}], "thresholds": {}}
    )
    assert bad.status_code == 422 and "give either event or if" in bad.text
    for raw in (b'{"rules": [{"name": "x", "event": "e", "points": NaN}]}', b"{nope"):
        refused = await time_api.put(
            "/v1/scoring", content=raw, headers={"content-type": "application/json"}
        )
        assert refused.status_code == 422, refused.text
    applied = await time_api.put(
        "/v1/scoring",
        json={
            "rules": [{"name": "demo", "event": demo, "points": 600}],
            "thresholds": {"mql": 1000, "sql": 5000},
        },
    )
    assert applied.status_code == 200, applied.text
    person = await contact(time_api)
    for n in range(2):
        response = await time_api.post(
            "/v1/events", json={"contact_id": person["id"], "name": demo, "id": f"{demo}-{n}"}
        )
        assert response.status_code == 202, response.text
    got = (await time_api.get(f"/v1/contacts/{person['id']}")).json()
    assert got["score"] == 1200 and got["lifecycle_stage"] == "mql"
    [run] = await enrollments_of(settings, handoff)
    assert str(run.contact_id) == person["id"]
    await result_of(time_env, run.workflow_id)
    async with session_scope(settings.database_url) as session:
        [task] = (
            await session.exec(
                select(CrmTask)
                .where(CrmTask.contact_id == run.contact_id)
                .where(CrmTask.journey_key == handoff)
            )
        ).all()
    assert task.note == "Call this MQL" and task.journey_key == handoff
