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
SA_VERSION = SearchAttributeKey.for_int("NurtureJourneyVersion")
SEARCH_ATTRIBUTES = (SA_JOURNEY, SA_CONTACT, SA_STEP, SA_STATUS, SA_VERSION)


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
class EventSignal:
    """An event of this contact, delivered to each of its running journeys."""

    event_id: str
    name: str
    properties: dict[str, Any] = field(default_factory=dict)
    occurred_at: str | None = None


@dataclass
class ContactSnapshot:
    """The contact fields conditions and templates see."""

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
    segments: list[str] = field(default_factory=list)  # keys of the segments it is in


@dataclass
class StepChoice:
    """A choice a step made from the contact's or the audience's data, and why."""

    kind: str  # send_time | channel | split
    choice: str
    reason: str
    decided_at: str


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
    contact: ContactSnapshot | None = None
    recent_events: list[EventSignal] = field(default_factory=list)
    journey_status: str = "active"  # active | paused (stopped ends the run)
    goal: str | None = None  # which exit_when goal was reached
    variant: str | None = None  # the variant the last split chose
    runs: int = 1  # how many runs (continue-as-new) this enrollment has used
    # The last choice of each best_time wait, channel: best send and winner-test split.
    choices: dict[str, StepChoice] = field(default_factory=dict)


@dataclass
class JourneyInput:
    enrollment_id: str
    journey_key: str
    journey_version: int
    document: dict[str, Any]
    contact_id: str
    trigger: dict[str, Any] | None = None
    state: JourneyState | None = None
    run_key: str = ""
    history_budget: int = 5_000
    # The contact as enrollment read it: saves the run an activity to read it again.
    contact: ContactSnapshot | None = None
    # Keep NurtureStep and NurtureStatus current (one billable action per step, one at the
    # end). Runs started before this field existed decode with True and replay unchanged.
    progress_search_attributes: bool = True


@dataclass
class JourneyResult:
    status: str
    exit_reason: str | None = None
    steps_taken: int = 0
    goal: str | None = None


@dataclass
class ContactChangedSignal:
    """The contact's profile changed (API upsert or another journey's update)."""

    contact: ContactSnapshot


@dataclass
class JourneyStatusSignal:
    status: str  # active | paused | stopped


@dataclass
class ControlRequest:
    """An operator's move: ``goto`` a step, or ``exit`` the journey."""

    action: str
    step: str | None = None
    reason: str | None = None


@dataclass
class ControlResult:
    accepted: bool
    message: str


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
    waiting_for: str | None = None
    next_wakeup: str | None = None
    goal: str | None = None
    variant: str | None = None
    journey_status: str = "active"
    choices: dict[str, StepChoice] = field(default_factory=dict)


@dataclass
class LoadContactInput:
    contact_id: str


@dataclass
class SendMessageInput:
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
    # The workflow's clock and the journey's zone, for frequency caps and quiet hours.
    now: str | None = None
    default_timezone: str | None = None
    # A broadcast's send (no enrollment, no journey): its id goes on the message row.
    broadcast_id: str | None = None


@dataclass
class SendMessageResult:
    message_id: str | None
    status: str  # sent | skipped | failed | held (journey paused) | deferred (cap, quiet hours)
    reason: str | None = None
    retry_at: str | None = None  # deferred: when to try again


# The names the first workflow code used; payloads are the same JSON.
SendEmailInput = SendMessageInput
SendEmailResult = SendMessageResult


@dataclass
class UpdateContactInput:
    idempotency_key: str
    contact_id: str
    set: dict[str, Any] = field(default_factory=dict)
    add_tags: list[str] = field(default_factory=list)
    remove_tags: list[str] = field(default_factory=list)
    score: int | None = None
    lifecycle_stage: str | None = None


@dataclass
class CrmInput:
    idempotency_key: str
    contact_id: str
    enrollment_id: str
    journey_key: str
    step_id: str
    action: str
    note: str | None = None
    owner: str | None = None
    due_in_seconds: int | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class WebhookInput:
    idempotency_key: str
    contact_id: str
    journey_key: str
    step_id: str
    url: str
    method: str = "POST"
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    trigger: dict[str, Any] | None = None


@dataclass
class WebhookResult:
    status_code: int


@dataclass
class EnrollInput:
    contact_id: str
    journey_key: str
    trigger: dict[str, Any] | None = None
    source: str | None = None


@dataclass
class EnrollResult:
    enrolled: bool
    enrollment_id: str | None = None
    reason: str | None = None


@dataclass
class RecordVariantInput:
    enrollment_id: str
    variant: str


@dataclass
class FinishEnrollmentInput:
    enrollment_id: str
    status: str
    exit_reason: str | None = None
    goal: str | None = None


@dataclass
class RefreshAudienceInput:
    """Refresh every contact's score, stage and segments (the scheduled refresh)."""

    reason: str = "schedule"


@dataclass
class RefreshAudienceResult:
    scores_changed: int = 0
    stages_advanced: int = 0
    segments_entered: int = 0
    segments_exited: int = 0
    events_delivered: int = 0


@dataclass
class SendTimeInput:
    """best_time: the contact's engagement by local hour of the week, over a lookback."""

    contact_id: str
    timezone: str  # the IANA zone the workflow resolved for the contact
    now: str
    lookback_seconds: int
    min_engagements: int


@dataclass
class SendTimeResult:
    engagements: int  # opens and clicks in the lookback
    weekday: int | None = None  # 0 = Monday; None: too little history
    hour: int | None = None
    count: int = 0  # engagements in that hour of the week


@dataclass
class ChooseChannelInput:
    """channel: best: which of the step's channels the contact can receive and engages with."""

    contact_id: str
    declared: str  # the step's own channel, kept on a tie
    channels: list[str]
    now: str
    lookback_seconds: int


@dataclass
class ChooseChannelResult:
    channel: str
    reason: str


@dataclass
class AssignSplitInput:
    """A contact reaches a winner-test split: record it, and go to the winner once decided."""

    journey_key: str
    step_id: str
    enrollment_id: str
    contact_id: str
    proposed: str  # the weighted, deterministic variant of the test phase
    variants: list[str]
    metric: str  # open | click | conversion
    success_events: list[str]
    test_size: int
    confidence: float
    observe_seconds: int
    now: str


@dataclass
class AssignSplitResult:
    variant: str
    reason: str
    status: str = "testing"  # testing | winner | no_difference
