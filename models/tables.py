"""Database tables (PostgreSQL only). Every timestamp is timezone-aware (timestamptz)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = True, default_now: bool = False, index: bool = False) -> Any:
    return Field(
        default_factory=utcnow if default_now else None,
        sa_type=sa.DateTime(timezone=True),
        nullable=nullable,
        index=index,
    )


def _jsonb() -> Any:
    return Field(default_factory=dict, sa_type=JSONB, nullable=False)


class SubscriptionStatus(StrEnum):
    subscribed = "subscribed"
    unsubscribed = "unsubscribed"
    bounced = "bounced"
    complained = "complained"


class Contact(SQLModel, table=True):
    __tablename__ = "contacts"
    __table_args__ = (
        sa.Index(
            "uq_contacts_email", "email", unique=True, postgresql_where=sa.text("email IS NOT NULL")
        ),
        sa.Index(
            "uq_contacts_external_id",
            "external_id",
            unique=True,
            postgresql_where=sa.text("external_id IS NOT NULL"),
        ),
        sa.Index("ix_contacts_phone", "phone"),
        sa.Index("ix_contacts_attributes", "attributes", postgresql_using="gin"),
        sa.Index("ix_contacts_tags", "tags", postgresql_using="gin"),
        sa.Index("ix_contacts_score", "score"),
        sa.Index("ix_contacts_lifecycle_stage", "lifecycle_stage"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str | None = Field(default=None, max_length=320)  # stored lower-cased
    phone: str | None = Field(default=None, max_length=32)  # E.164
    external_id: str | None = Field(default=None, max_length=200)
    anonymous_id: str | None = Field(default=None, max_length=200, index=True)
    attributes: dict[str, Any] = _jsonb()
    timezone: str | None = Field(default=None, max_length=64)
    lifecycle_stage: str = Field(default="subscriber", max_length=32)
    # The score is score_adjustment (update_contact deltas, API edits) plus the points of
    # the scoring rules, recomputed by the audience refresh.
    score: int = 0
    score_adjustment: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    tags: list[str] = Field(
        default_factory=list,
        sa_type=ARRAY(sa.Text),
        nullable=False,
    )
    email_status: SubscriptionStatus = Field(
        default=SubscriptionStatus.subscribed,
        sa_type=sa.String(16),
        nullable=False,
    )
    sms_status: SubscriptionStatus = Field(
        default=SubscriptionStatus.subscribed,
        sa_type=sa.String(16),
        nullable=False,
    )
    # The contact's id in the outward CRM (e.g. HubSpot's contact id), once synced.
    crm_id: str | None = Field(default=None, max_length=100)
    # An anonymous visitor merged into an identified contact points at it; it is a tombstone.
    merged_into: uuid.UUID | None = Field(default=None, foreign_key="contacts.id")
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)
    erased_at: datetime | None = _ts()

    def merge_attributes(self, changes: dict[str, Any]) -> bool:
        """Merge ``changes`` into the attributes (``None`` deletes a key); return whether
        anything changed. A new dict, so SQLAlchemy sees the JSONB column change."""
        merged = dict(self.attributes)
        for name, value in changes.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        if merged == self.attributes:
            return False
        self.attributes = merged
        return True


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_contact_name_time", "contact_id", "name", "occurred_at"),
        sa.Index("ix_events_name_time", "name", "occurred_at"),
        sa.Index(
            "ix_events_undelivered",
            "received_at",
            postgresql_where=sa.text("delivered_at IS NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    idempotency_id: str = Field(max_length=200, unique=True)
    contact_id: uuid.UUID | None = Field(
        default=None, foreign_key="contacts.id", ondelete="SET NULL"
    )
    name: str = Field(max_length=200)
    properties: dict[str, Any] = _jsonb()
    occurred_at: datetime = _ts(nullable=False, default_now=True)
    received_at: datetime = _ts(nullable=False, default_now=True)
    source: str = Field(default="api", max_length=32)
    delivered_at: datetime | None = _ts()
    # The inbox drain's bookkeeping for an event it could not deliver (activities/inbox.py):
    # tries so far, the last failure, when to try next, and when it gave up (parked).
    delivery_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    delivery_error: str | None = None
    next_delivery_at: datetime | None = _ts()
    delivery_parked_at: datetime | None = _ts()


class TemplateChannel(StrEnum):
    email = "email"
    sms = "sms"


class Template(SQLModel, table=True):
    __tablename__ = "templates"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key: str = Field(max_length=64, unique=True)
    channel: TemplateChannel = Field(sa_type=sa.String(8), nullable=False)
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)


class JourneyStatus(StrEnum):
    draft = "draft"
    active = "active"
    paused = "paused"
    stopped = "stopped"


class Journey(SQLModel, table=True):
    __tablename__ = "journeys"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    status: JourneyStatus = Field(
        default=JourneyStatus.draft,
        sa_type=sa.String(16),
        nullable=False,
    )
    draft: dict[str, Any] = _jsonb()
    current_version: int | None = None
    # The published version's trigger event, so an incoming event finds its journeys fast.
    trigger_event: str | None = Field(default=None, max_length=200, index=True)
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)


class JourneyVersion(SQLModel, table=True):
    """An immutable published journey document; enrollments stay on the one they began with."""

    __tablename__ = "journey_versions"
    __table_args__ = (sa.UniqueConstraint("journey_id", "version", name="uq_journey_versions"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    journey_id: uuid.UUID = Field(foreign_key="journeys.id", ondelete="CASCADE")
    version: int
    document: dict[str, Any] = _jsonb()
    published_at: datetime = _ts(nullable=False, default_now=True)


class EnrollmentStatus(StrEnum):
    active = "active"
    completed = "completed"
    exited = "exited"
    failed = "failed"


class Enrollment(SQLModel, table=True):
    __tablename__ = "enrollments"
    __table_args__ = (
        # Promise 1: at most one active run per (journey, contact, key value).
        sa.Index(
            "uq_enrollments_active",
            "journey_id",
            "contact_id",
            "run_key",
            unique=True,
            postgresql_where=sa.text("status = 'active'"),
        ),
        sa.Index("ix_enrollments_contact_status", "contact_id", "status"),
        sa.Index("ix_enrollments_journey_status", "journey_id", "status"),
        # The inbox drain looks for runs that never started every few seconds.
        sa.Index(
            "ix_enrollments_unstarted",
            "started_at",
            postgresql_where=sa.text("status = 'active' AND run_id IS NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    journey_id: uuid.UUID = Field(foreign_key="journeys.id")
    journey_version_id: uuid.UUID = Field(foreign_key="journey_versions.id")
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE")
    run_key: str = Field(default="", max_length=200)
    workflow_id: str = Field(max_length=400, index=True)
    run_id: str | None = Field(default=None, max_length=64)
    status: EnrollmentStatus = Field(
        default=EnrollmentStatus.active,
        sa_type=sa.String(16),
        nullable=False,
    )
    variant: str | None = Field(default=None, max_length=64)
    exit_reason: str | None = Field(default=None, max_length=200)
    goal: str | None = Field(default=None, max_length=500)
    trigger_event_id: uuid.UUID | None = None
    # The trigger the run was enrolled with, so a start that failed can be finished later.
    trigger: dict[str, Any] | None = Field(default=None, sa_type=JSONB, nullable=True)
    started_at: datetime = _ts(nullable=False, default_now=True)
    ended_at: datetime | None = _ts()


class MessageChannel(StrEnum):
    email = "email"
    sms = "sms"


class MessageStatus(StrEnum):
    pending = "pending"  # row written, provider not yet called
    sending = "sending"  # a provider call is under way (or died without an answer)
    unconfirmed = "unconfirmed"  # an attempt may have reached the provider: never re-sent
    sent = "sent"
    delivered = "delivered"
    opened = "opened"
    clicked = "clicked"
    bounced = "bounced"
    complained = "complained"
    unsubscribed = "unsubscribed"
    failed = "failed"
    skipped = "skipped"  # suppressed or otherwise not sent, with skip_reason


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        sa.Index("ix_messages_contact_created", "contact_id", "created_at"),
        sa.Index("ix_messages_journey_step", "journey_id", "step_id", "status"),
        sa.Index(
            "uq_messages_provider_id",
            "provider",
            "provider_message_id",
            unique=True,
            postgresql_where=sa.text("provider_message_id IS NOT NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # Business key made in the workflow (enrollment, step, visit): one send per key, ever.
    idempotency_key: str = Field(max_length=400, unique=True)
    contact_id: uuid.UUID | None = Field(
        default=None, foreign_key="contacts.id", ondelete="SET NULL"
    )
    enrollment_id: uuid.UUID | None = Field(
        default=None, foreign_key="enrollments.id", ondelete="SET NULL", index=True
    )
    journey_id: uuid.UUID | None = Field(default=None, foreign_key="journeys.id")
    step_id: str | None = Field(default=None, max_length=64)
    variant: str | None = Field(default=None, max_length=64)
    # The enrollment's journey version, copied so metrics per version need no join.
    journey_version: int | None = None
    channel: MessageChannel = Field(sa_type=sa.String(8), nullable=False)
    template_key: str | None = Field(default=None, max_length=64)
    to_address: str | None = Field(default=None, max_length=320)
    subject: str | None = None
    provider: str = Field(max_length=32)
    provider_message_id: str | None = Field(default=None, max_length=200)
    status: MessageStatus = Field(
        default=MessageStatus.pending,
        sa_type=sa.String(16),
        nullable=False,
    )
    skip_reason: str | None = Field(default=None, max_length=200)
    error: str | None = None
    created_at: datetime = _ts(nullable=False, default_now=True)
    sent_at: datetime | None = _ts()
    delivered_at: datetime | None = _ts()
    opened_at: datetime | None = _ts()
    clicked_at: datetime | None = _ts()
    bounced_at: datetime | None = _ts()
    complained_at: datetime | None = _ts()
    unsubscribed_at: datetime | None = _ts()
    failed_at: datetime | None = _ts()
    # The broadcast that sent it (None: a journey's message), for per-broadcast reports.
    broadcast_id: uuid.UUID | None = Field(
        default=None, foreign_key="broadcasts.id", ondelete="SET NULL", index=True
    )


class SuppressionReason(StrEnum):
    unsubscribed = "unsubscribed"
    bounced = "bounced"
    complained = "complained"
    sms_opt_out = "sms_opt_out"
    manual = "manual"


def hashed_address(address: str) -> str:
    """How an erased contact's suppressed address is kept: it still matches, but is not PII."""
    return "sha256:" + hashlib.sha256(address.strip().lower().encode()).hexdigest()


class Suppression(SQLModel, table=True):
    """An address no message may go to on a channel, checked by the send activity."""

    __tablename__ = "suppressions"
    __table_args__ = (sa.UniqueConstraint("channel", "address", name="uq_suppressions"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    channel: MessageChannel = Field(sa_type=sa.String(8), nullable=False)
    address: str = Field(max_length=320)  # lower-cased email or E.164 phone
    reason: SuppressionReason = Field(sa_type=sa.String(16), nullable=False)
    source: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(nullable=False, default_now=True)


class CrmTaskStatus(StrEnum):
    open = "open"
    done = "done"


class CrmTask(SQLModel, table=True):
    """A sales task or CRM update made by a journey, kept in Nurture's own tables."""

    __tablename__ = "crm_tasks"
    __table_args__ = (sa.Index("ix_crm_tasks_contact_created", "contact_id", "created_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    idempotency_key: str = Field(max_length=400, unique=True)
    contact_id: uuid.UUID | None = Field(
        default=None, foreign_key="contacts.id", ondelete="SET NULL"
    )
    enrollment_id: uuid.UUID | None = Field(
        default=None, foreign_key="enrollments.id", ondelete="SET NULL"
    )
    journey_key: str | None = Field(default=None, max_length=64)
    step_id: str | None = Field(default=None, max_length=64)
    action: str = Field(max_length=32)  # create_task | update_contact
    note: str | None = None
    owner: str | None = Field(default=None, max_length=200)
    properties: dict[str, Any] = _jsonb()
    status: CrmTaskStatus = Field(default=CrmTaskStatus.open, sa_type=sa.String(16), nullable=False)
    due_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False, default_now=True)
    # Outward sync through the configured CRM adapter (none, webhook, hubspot).
    external_id: str | None = Field(default=None, max_length=200)
    synced_at: datetime | None = _ts()
    sync_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    sync_error: str | None = None


class WebhookCall(SQLModel, table=True):
    """One outbound webhook per business key: a retry re-sends the same signed body."""

    __tablename__ = "webhook_calls"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    idempotency_key: str = Field(max_length=400, unique=True)
    contact_id: uuid.UUID | None = Field(
        default=None, foreign_key="contacts.id", ondelete="SET NULL"
    )
    journey_key: str | None = Field(default=None, max_length=64)
    step_id: str | None = Field(default=None, max_length=64)
    url: str
    method: str = Field(max_length=8)
    status_code: int | None = None
    attempts: int = 0
    created_at: datetime = _ts(nullable=False, default_now=True)
    completed_at: datetime | None = _ts()


class AppliedUpdate(SQLModel, table=True):
    """Business keys of contact updates already applied (a retry must not add twice)."""

    __tablename__ = "applied_updates"

    idempotency_key: str = Field(max_length=400, primary_key=True)
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE")
    created_at: datetime = _ts(nullable=False, default_now=True)


class Segment(SQLModel, table=True):
    """A named condition over contacts; its members are kept in ``segment_members``."""

    __tablename__ = "segments"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    description: str | None = None
    condition: dict[str, Any] = _jsonb()
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)
    refreshed_at: datetime | None = _ts()


class SegmentMember(SQLModel, table=True):
    """A contact currently in a segment (entering and leaving are also events)."""

    __tablename__ = "segment_members"
    __table_args__ = (sa.Index("ix_segment_members_contact", "contact_id"),)

    segment_id: uuid.UUID = Field(foreign_key="segments.id", ondelete="CASCADE", primary_key=True)
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE", primary_key=True)
    entered_at: datetime = _ts(nullable=False, default_now=True)


class ScoringModel(SQLModel, table=True):
    """The lead-scoring rules and lifecycle thresholds (one document per key; ``default``)."""

    __tablename__ = "scoring_models"

    key: str = Field(max_length=64, primary_key=True)
    document: dict[str, Any] = _jsonb()
    updated_at: datetime = _ts(nullable=False, default_now=True)


class SplitTestStatus(StrEnum):
    testing = "testing"
    winner = "winner"
    no_difference = "no_difference"


class SplitTest(SQLModel, table=True):
    """A split with a winner test: shared by every enrollment of the journey (all versions
    with that step id), so the decision is made once, in PostgreSQL."""

    __tablename__ = "split_tests"
    __table_args__ = (sa.UniqueConstraint("journey_key", "step_id", name="uq_split_tests"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    journey_key: str = Field(max_length=64)
    step_id: str = Field(max_length=64)
    metric: str = Field(max_length=16)
    status: SplitTestStatus = Field(
        default=SplitTestStatus.testing, sa_type=sa.String(16), nullable=False
    )
    winner: str | None = Field(default=None, max_length=64)
    p_value: float | None = None
    # Per-variant observed contacts and successes at the decision.
    stats: dict[str, Any] = _jsonb()
    created_at: datetime = _ts(nullable=False, default_now=True)
    decided_at: datetime | None = _ts()


class SplitAssignment(SQLModel, table=True):
    """Which variant of a winner-test split an enrollment got, and when (the workflow's time)."""

    __tablename__ = "split_assignments"
    __table_args__ = (
        sa.Index("ix_split_assignments_variant", "split_test_id", "variant", "assigned_at"),
    )

    split_test_id: uuid.UUID = Field(
        foreign_key="split_tests.id", ondelete="CASCADE", primary_key=True
    )
    enrollment_id: uuid.UUID = Field(
        foreign_key="enrollments.id", ondelete="CASCADE", primary_key=True
    )
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE")
    variant: str = Field(max_length=64)
    assigned_at: datetime = _ts(nullable=False)


class ApiKey(SQLModel, table=True):
    """An API key: only its SHA-256 is stored (the key is shown once, at creation)."""

    __tablename__ = "api_keys"
    __table_args__ = (
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.Index("ix_api_keys_prefix", "prefix"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200)
    # The key's first characters, shown in listings and used to find the row.
    prefix: str = Field(max_length=32)
    key_hash: str = Field(max_length=64)
    scopes: list[str] = Field(default_factory=list, sa_type=ARRAY(sa.String()), nullable=False)
    created_at: datetime = _ts(nullable=False, default_now=True)
    last_used_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


class RateLimitCounter(SQLModel, table=True):
    """Requests counted per (bucket, fixed window), shared by every API process."""

    __tablename__ = "rate_limit_counters"
    __table_args__ = (sa.Index("ix_rate_limit_counters_window_start", "window_start"),)

    bucket: str = Field(max_length=200, primary_key=True)
    window_start: datetime = Field(sa_type=sa.DateTime(timezone=True), primary_key=True)
    count: int = 0


class SegmentSize(SQLModel, table=True):
    """A segment's member count at one full audience refresh: its size over time."""

    __tablename__ = "segment_sizes"
    __table_args__ = (sa.Index("ix_segment_sizes_segment_measured", "segment_id", "measured_at"),)

    id: int | None = Field(default=None, primary_key=True)
    segment_id: uuid.UUID = Field(foreign_key="segments.id", ondelete="CASCADE")
    measured_at: datetime = _ts(nullable=False, default_now=True)
    size: int


class BulkJobStatus(StrEnum):
    running = "running"
    completed = "completed"
    cancelled = "cancelled"
    failed = "failed"


class BulkEnrollmentJob(SQLModel, table=True):
    """One bulk enrollment (a list or a segment into a journey), run by BulkEnrollWorkflow.

    The counts are kept in step with ``bulk_enrollment_items`` in the same transactions,
    so the API reads progress from here without asking the workflow.
    """

    __tablename__ = "bulk_enrollment_jobs"
    __table_args__ = (
        sa.Index("ix_bulk_enrollment_jobs_journey_created", "journey_id", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    journey_id: uuid.UUID = Field(foreign_key="journeys.id", ondelete="CASCADE")
    source: str = Field(max_length=16)  # list | segment
    segment_key: str | None = Field(default=None, max_length=64)
    schedule_id: uuid.UUID | None = Field(
        default=None, foreign_key="enrollment_schedules.id", ondelete="SET NULL"
    )
    workflow_id: str = Field(max_length=400, unique=True)
    status: BulkJobStatus = Field(
        default=BulkJobStatus.running, sa_type=sa.String(16), nullable=False
    )
    total: int | None = None  # known once the audience is fixed
    enrolled: int = 0
    already_enrolled: int = 0
    skipped: int = 0
    failed: int = 0
    error: str | None = None
    created_at: datetime = _ts(nullable=False, default_now=True)
    audience_fixed_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()


class BulkEnrollmentItem(SQLModel, table=True):
    """The job's ledger: one row per contact of its audience, with what happened to it.

    The primary key (job, contact) fixes the audience once; ``outcome`` is set in the same
    transaction that bumps the job's counts, and only while it is still NULL, so a retried
    page neither enrolls nor counts anyone twice.
    """

    __tablename__ = "bulk_enrollment_items"
    __table_args__ = (
        sa.Index(
            "ix_bulk_enrollment_items_pending",
            "job_id",
            "contact_id",
            postgresql_where=sa.text("outcome IS NULL"),
        ),
    )

    job_id: uuid.UUID = Field(
        foreign_key="bulk_enrollment_jobs.id", ondelete="CASCADE", primary_key=True
    )
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE", primary_key=True)
    # enrolled | already_enrolled | skipped | failed (NULL: not done yet)
    outcome: str | None = Field(default=None, max_length=16)
    enrollment_id: uuid.UUID | None = Field(
        default=None, foreign_key="enrollments.id", ondelete="SET NULL"
    )
    reason: str | None = Field(default=None, max_length=300)
    done_at: datetime | None = _ts()


class EnrollmentSchedule(SQLModel, table=True):
    """A recurring bulk enrollment of a segment into a journey; the Temporal Schedule
    ``enrollment-schedule/<id>`` does the timing, this row names it for the API."""

    __tablename__ = "enrollment_schedules"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    journey_id: uuid.UUID = Field(foreign_key="journeys.id", ondelete="CASCADE", index=True)
    segment_key: str = Field(max_length=64)
    cron: str = Field(max_length=200)
    timezone: str = Field(default="UTC", max_length=64)
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)


class BroadcastStatus(StrEnum):
    scheduled = "scheduled"  # waiting for send_at
    sending = "sending"
    paused = "paused"
    completed = "completed"
    cancelled = "cancelled"
    failed = "failed"


class Broadcast(SQLModel, table=True):
    """A one-time send of a template to a segment, run by one BroadcastWorkflow."""

    __tablename__ = "broadcasts"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    template_key: str = Field(max_length=64)
    segment_key: str = Field(max_length=64)
    channel: MessageChannel = Field(sa_type=sa.String(8), nullable=False)
    send_at: datetime | None = _ts()  # None: now
    # local_time: send_at's wall-clock time, in each contact's zone (else default_timezone).
    local_time: str | None = Field(default=None, max_length=32)
    default_timezone: str | None = Field(default=None, max_length=64)
    rate_per_second: float
    burst: int
    error_policy: str = Field(default="skip", max_length=8)  # skip | pause
    status: BroadcastStatus = Field(
        default=BroadcastStatus.scheduled, sa_type=sa.String(16), nullable=False
    )
    status_reason: str | None = None
    workflow_id: str = Field(max_length=400, unique=True)
    total: int | None = None
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    created_at: datetime = _ts(nullable=False, default_now=True)
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()


class BroadcastRecipient(SQLModel, table=True):
    """The broadcast's audience, fixed when sending starts, and each contact's outcome."""

    __tablename__ = "broadcast_recipients"
    __table_args__ = (
        sa.Index(
            "ix_broadcast_recipients_pending",
            "broadcast_id",
            "zone",
            "contact_id",
            postgresql_where=sa.text("outcome IS NULL"),
        ),
    )

    broadcast_id: uuid.UUID = Field(
        foreign_key="broadcasts.id", ondelete="CASCADE", primary_key=True
    )
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE", primary_key=True)
    zone: str = Field(default="UTC", max_length=64)  # the zone its local time is judged in
    # sent | skipped | failed | unconfirmed (NULL: not done yet)
    outcome: str | None = Field(default=None, max_length=16)
    message_id: uuid.UUID | None = None
    reason: str | None = None
    attempts: int = 0
    # The broadcast's clock (workflow time) when this contact's group was released.
    released_at: datetime | None = _ts()
    done_at: datetime | None = _ts()
