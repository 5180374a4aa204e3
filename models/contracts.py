"""Inputs and results of the journey workflow, its signals, queries and activities.

One dataclass each; new fields always get defaults so running workflows keep decoding.
Times are ISO 8601 strings so histories stay readable in the Temporal UI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from temporalio.common import SearchAttributeKey

SA_JOURNEY = SearchAttributeKey.for_keyword("NurtureJourney")
SA_CONTACT = SearchAttributeKey.for_keyword("NurtureContact")
SA_STEP = SearchAttributeKey.for_keyword("NurtureStep")
SA_STATUS = SearchAttributeKey.for_keyword("NurtureStatus")
SEARCH_ATTRIBUTES = (SA_JOURNEY, SA_CONTACT, SA_STEP, SA_STATUS)


def journey_workflow_id(journey_key: str, contact_id: str, run_key: str = "") -> str:
    """Deterministic workflow id: one per (journey, contact[, key value])."""
    base = f"journey/{journey_key}/contact/{contact_id}"
    return f"{base}/key/{run_key}" if run_key else base


@dataclass
class StepRecord:
    step_id: str
    step_type: str
    entered_at: str
    outcome: str | None = None
    left_at: str | None = None


@dataclass
class JourneyState:
    """Everything the journey knows; carried across continue-as-new."""

    position: int = 0
    status: str = "active"  # active | completed | exited | failed
    exit_reason: str | None = None
    visits: dict[str, int] = field(default_factory=dict)
    history: list[StepRecord] = field(default_factory=list)
    seen_event_ids: list[str] = field(default_factory=list)
    steps_taken: int = 0


@dataclass
class JourneyInput:
    enrollment_id: str
    journey_key: str
    journey_version: int
    document: dict[str, Any]
    contact_id: str
    trigger: dict[str, Any] | None = None
    state: JourneyState | None = None


@dataclass
class JourneyResult:
    status: str
    exit_reason: str | None = None
    steps_taken: int = 0


@dataclass
class EventSignal:
    """An event of this contact, delivered to each of its running journeys."""

    event_id: str
    name: str
    properties: dict[str, Any] = field(default_factory=dict)
    occurred_at: str | None = None


@dataclass
class JourneyStateView:
    """What the enrollment-state query answers."""

    enrollment_id: str
    journey_key: str
    journey_version: int
    contact_id: str
    status: str
    current_step: str | None
    exit_reason: str | None
    history: list[StepRecord]


@dataclass
class LoadContactInput:
    contact_id: str


@dataclass
class ContactSnapshot:
    """The contact fields conditions and templates see (no PII beyond what they need)."""

    id: str
    found: bool = True
    email: str | None = None
    phone: str | None = None
    external_id: str | None = None
    timezone: str | None = None
    lifecycle_stage: str | None = None
    score: int = 0
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SendEmailInput:
    idempotency_key: str
    enrollment_id: str
    contact_id: str
    journey_key: str
    journey_version: int
    step_id: str
    template: str
    subject: str | None = None
    variant: str | None = None
    trigger: dict[str, Any] | None = None


@dataclass
class SendEmailResult:
    message_id: str
    status: str  # sent | skipped | failed
    reason: str | None = None


@dataclass
class FinishEnrollmentInput:
    enrollment_id: str
    status: str
    exit_reason: str | None = None
