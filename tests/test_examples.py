"""The ready-made journeys and templates in examples/: they validate, name templates that
exist on the right channel, render with full, messy and missing data, publish through the
API, and the birthday journey greets on the next birthday and loops to the one after."""

from __future__ import annotations

import asyncio
import copy
import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.audience import CONDITION, dependency_order
from activities.rendering import check_template, render_context, render_email, render_text
from api.schemas import TemplateIn
from models.journey import EmailStep, SplitStep, parse_journey
from models.scoring import ScoringModelDocument
from settings import Settings
from tests.helpers import EXAMPLES, contact, enroll, publish, wait_for_step
from tests.test_journey_workflow import messages_of, result_of

JOURNEY_FILES = sorted((EXAMPLES / "journeys").glob("*.yaml"))
TEMPLATE_FILES = sorted((EXAMPLES / "templates").glob("*.yaml"))
TEMPLATES: dict[str, dict[str, Any]] = {
    p.stem: yaml.safe_load(p.read_text()) for p in TEMPLATE_FILES
}

# The original demo's templates, kept as they were: `default('there')` leaves a null
# first_name empty ("Hi ,"); the newer templates use `default(..., true)`.
TRIAL_NURTURE_TEMPLATES = {"trial-offer", "exec-track", "practitioner-track"}
EXPECTED_JOURNEYS = {
    "abandoned-cart", "birthday", "customer-education", "event-invitation", "re-engagement",
    "trial-nurture", "welcome-series", "sales-handoff",
}  # fmt: skip

FULL_TRIGGER: dict[str, Any] = {
    "event": "example",
    "properties": {
        "cart_id": "c-1001",
        "items": [
            {"name": "Trail Runner 2", "quantity": 2, "price": 89.5},
            {"name": "Merino Socks", "quantity": 1, "price": "14"},
        ],
        "currency": "EUR",
        "total": 193,
        "cart_url": "https://shop.example.com/cart/c-1001",
        "discount_code": "COMEBACK10",
        "event_id": "ev-42",
        "event_name": "Nurture Live: Lifecycle in 45 minutes",
        "event_at": "2026-03-12T16:00:00Z",
        "event_when": "Thursday 12 March, 4 p.m. GMT",
        "location": "Online",
        "speaker": "Maya Lindqvist",
        "register_url": "https://example.com/events/42",
        "join_url": "https://example.com/live/42",
        "calendar_url": "https://example.com/events/42.ics",
        "recording_url": "https://example.com/events/42/recording",
        "slides_url": "https://example.com/events/42/slides",
        "plan": "Growth",
    },
}
FULL_CONTACT: dict[str, Any] = {
    "email": "ada@example.com",
    "phone": "+14155550100",
    "timezone": "Europe/London",
    "lifecycle_stage": "lead",
    "score": 20,
    "tags": ["welcomed"],
    "attributes": {
        "first_name": "Ada",
        "company": "Analytical Engines",
        "role": "CMO",
        "birthday": "1990-06-14",
        "birthday_code": "ADA15",
    },
}
# Data as it arrives in real life: items as bare names, prices as text, gaps everywhere.
MESSY_TRIGGER: dict[str, Any] = {
    "properties": {
        "items": ["Trail Runner 2", {"quantity": "3"}, {"name": "Gift card", "price": None}],
        "total": "n/a",
        "currency": "",
        "event_name": None,
    }
}
CONTEXTS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "full": (FULL_CONTACT, FULL_TRIGGER),
    "messy": ({"email": "x@example.com", "attributes": {"first_name": None}}, MESSY_TRIGGER),
    "empty": ({}, None),
}
JOURNEY_CONTEXT = {"key": "example", "version": 1, "step": "s", "variant": "subject-plain"}


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), path
    return document


def test_every_ready_made_journey_is_there() -> None:
    assert {p.stem for p in JOURNEY_FILES} >= EXPECTED_JOURNEYS


@pytest.mark.parametrize("path", JOURNEY_FILES, ids=lambda p: p.stem)
def test_journey_validates_and_names_templates_that_exist(path: Path) -> None:
    document = parse_journey(load(path))

    assert document.key == path.stem
    assert document.default_timezone
    if path.stem != "trial-nurture":  # the original demo, kept as it was
        assert [s.id for s in document.steps if not s.label] == [], "steps without a label"
    for channel, keys in document.templates().items():
        for key in keys:
            assert key in TEMPLATES, f"{path.stem}: no template {key!r} in examples/templates"
            assert TEMPLATES[key]["channel"] == channel, f"{key} is not an {channel} template"
    for target in document.journeys():
        # load_examples publishes in file-name order: an enroll target must come first.
        assert target in {p.stem for p in JOURNEY_FILES} and target < path.stem


def test_example_segments_and_scoring_validate() -> None:
    segments = {p.stem: load(p) for p in sorted((EXAMPLES / "segments").glob("*.yaml"))}
    assert {"customers", "hot-leads", "pricing-visitors"} <= set(segments)
    conditions = {k: CONDITION.validate_python(body["condition"]) for k, body in segments.items()}
    order = dependency_order(conditions)
    assert order.index("pricing-visitors") < order.index("hot-leads")
    scoring = ScoringModelDocument.model_validate(load(EXAMPLES / "scoring.yaml"))
    assert scoring.stage_for(50) == "mql"
    # The hand-off journey listens for the event the thresholds produce.
    handoff = parse_journey(load(EXAMPLES / "journeys" / "sales-handoff.yaml"))
    assert handoff.trigger is not None and handoff.trigger.event == "became_mql"


def test_every_template_is_used_by_a_journey() -> None:
    used = set()
    for path in JOURNEY_FILES:
        for keys in parse_journey(load(path)).templates().values():
            used |= keys
    assert set(TEMPLATES) == used


@pytest.mark.parametrize("context", CONTEXTS, ids=str)
@pytest.mark.parametrize("key", TEMPLATES, ids=str)
def test_template_compiles_and_renders_without_gaps(key: str, context: str) -> None:
    template = TemplateIn.model_validate(TEMPLATES[key])
    check_template("subject", template.subject)
    check_template("html", template.html, html=True)
    check_template("text", template.text)
    person, trigger = CONTEXTS[context]
    values = render_context(person, JOURNEY_CONTEXT, trigger)

    if template.channel == "sms":
        assert template.text
        parts = [render_text(template.text, values)]
        assert len(parts[0]) <= 160 and parts[0].isascii(), parts[0]
    else:
        assert template.subject and template.html and template.text
        email = render_email(template.subject, template.html, template.text, values)
        assert email.subject and email.html and email.text
        parts = [email.subject, email.html, email.text]
    gaps: tuple[str, ...] = ("None", "Undefined", "{{", "{%", "<built-in")
    if key not in TRIAL_NURTURE_TEMPLATES:
        gaps += (" ,", " :", "()")  # a null or empty field leaves no hole in the copy
    for part in parts:
        for leftover in gaps:
            assert leftover not in part, f"{key} renders {leftover!r}:\n{part}"


def test_cart_reminders_name_the_items() -> None:
    values = render_context(FULL_CONTACT, JOURNEY_CONTEXT, FULL_TRIGGER)
    reminder = TEMPLATES["cart-reminder"]
    email = render_email(reminder["subject"], reminder["html"], reminder["text"], values)
    assert email.subject == "Ada, you left something in your cart"
    assert email.text is not None and email.html is not None
    assert "- Trail Runner 2 x 2 (89.50 EUR)" in email.text
    assert "- Merino Socks (14.00 EUR)" in email.text
    assert "Total: 193.00 EUR" in email.text
    assert "Trail Runner 2 &times; 2" in email.html
    assert "https://shop.example.com/cart/c-1001" in email.html

    last = TEMPLATES["cart-last-call"]
    email = render_email(last["subject"], last["html"], last["text"], values)
    assert email.subject == "Your cart expires soon: here is 10% off"
    assert email.text is not None and "We are holding the Trail Runner 2 and 1 more" in email.text
    assert "COMEBACK10" in email.text


def test_lesson_five_subjects_differ_by_variant() -> None:
    document = parse_journey(load(EXAMPLES / "journeys" / "customer-education.yaml"))
    [split] = [s for s in document.steps if isinstance(s, SplitStep)]
    sends = [s for s in document.steps if isinstance(s, EmailStep) and s.id in split.targets()]
    assert len(sends) == 2 and {s.template for s in sends} == {"course-lesson-5"}
    assert len({s.subject for s in sends}) == 2


def renamed(document: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The document under a key (and trigger event) of its own, with enroll targets to match.

    The test database is shared: unique keys keep tests apart, and a suffixed trigger
    event keeps other tests' ``signed_up`` or ``cart_abandoned`` from starting these.
    """
    copied = copy.deepcopy(document)
    copied["key"] = f"{document['key']}-{suffix}"
    if copied.get("trigger"):
        copied["trigger"]["event"] = f"{copied['trigger']['event']}_{suffix}"
    for step in copied["steps"]:
        if step["type"] == "enroll":
            step["journey"] = f"{step['journey']}-{suffix}"
    return copied


async def test_examples_load_and_publish_through_the_api(time_api: httpx.AsyncClient) -> None:
    for key, body in TEMPLATES.items():
        response = await time_api.put(f"/v1/templates/{key}", json=body)
        assert response.status_code in (200, 201), response.text
    suffix = uuid.uuid4().hex[:8]

    for path in JOURNEY_FILES:  # file-name order, as devstack's load_examples
        document = renamed(load(path), suffix)
        created = await time_api.post("/v1/journeys", json=document)
        assert created.status_code == 201, created.text
        published = await time_api.post(f"/v1/journeys/{document['key']}/publish")
        assert published.status_code == 201, published.text
        assert published.json()["version"] == 1

    listed = {j["key"]: j for j in (await time_api.get("/v1/journeys")).json()}
    for path in JOURNEY_FILES:
        assert listed[f"{path.stem}-{suffix}"]["status"] == "active"


async def state(api: httpx.AsyncClient, enrollment_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/enrollments/{enrollment_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def settled_messages(settings: Settings, enrollment_id: str, count: int) -> list[Any]:
    for _ in range(200):
        sent = await messages_of(settings, enrollment_id)
        if len(sent) >= count and all(m.status != "pending" for m in sent):
            return sent
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} messages, have {sent}")


def nine_am(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(9), zone).astimezone(UTC)


async def test_birthday_greets_on_the_next_birthday_and_waits_for_the_one_after(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    body = TEMPLATES["birthday-greeting"]
    response = await time_api.put("/v1/templates/birthday-greeting", json=body)
    assert response.status_code in (200, 201), response.text
    document = renamed(load(EXAMPLES / "journeys" / "birthday.yaml"), uuid.uuid4().hex[:8])
    await publish(time_api, document)
    zone = ZoneInfo("Europe/Paris")
    today = (await time_env.get_current_time()).astimezone(zone).date()
    birthday = today + timedelta(days=10)
    if (birthday.month, birthday.day) == (2, 29):
        birthday += timedelta(days=1)
    person = await contact(
        time_api,
        timezone="Europe/Paris",
        attributes={"first_name": "Ada", "birthday": birthday.replace(year=1992).isoformat()},
    )
    enrolled = (await enroll(time_api, document["key"], person["id"]))["enrollment"]

    view = await wait_for_step(time_api, enrolled["id"], "until-birthday")
    assert datetime.fromisoformat(view["next_wakeup"]) == nine_am(birthday, zone)
    assert await messages_of(settings, enrolled["id"]) == []

    await time_env.sleep(timedelta(days=11))
    [greeting] = await settled_messages(settings, enrolled["id"], 1)
    assert greeting.step_id == "greeting" and greeting.status == "sent"
    assert greeting.subject == "Happy birthday, Ada! A gift from us inside"

    await time_env.sleep(timedelta(days=2))
    view = await wait_for_step(time_api, enrolled["id"], "until-birthday")
    next_year = birthday.replace(year=birthday.year + 1)
    assert datetime.fromisoformat(view["next_wakeup"]) == nine_am(next_year, zone)
    assert len(await messages_of(settings, enrolled["id"])) == 1

    moved = await time_api.post(
        f"/v1/enrollments/{enrolled['id']}/move", json={"action": "exit", "reason": "test over"}
    )
    assert moved.status_code == 200, moved.text
    result = await result_of(time_env, enrolled["workflow_id"])
    assert result.status == "exited"
    steps = [h["step_id"] for h in (await state(time_api, enrolled["id"]))["history"]]
    assert steps[:6] == [
        "knows-birthday", "until-birthday", "greeting", "day-after", "next-year",
        "knows-birthday",
    ]  # fmt: skip
