"""Inputs, results and query views of the campaign workflows: bulk enrollment and
broadcasts. One dataclass each; new fields always get defaults."""

from __future__ import annotations

from dataclasses import dataclass, field


def bulk_workflow_id(job_id: str) -> str:
    return f"bulk-enroll/{job_id}"


def enrollment_schedule_id(schedule_id: str) -> str:
    return f"enrollment-schedule/{schedule_id}"


def broadcast_workflow_id(broadcast_id: str) -> str:
    return f"broadcast/{broadcast_id}"


@dataclass
class BulkProgress:
    """What the ``progress`` query answers (and what continue-as-new carries)."""

    job_id: str = ""
    status: str = "running"  # running | completed | cancelled | failed
    total: int | None = None
    enrolled: int = 0
    already_enrolled: int = 0
    skipped: int = 0
    failed: int = 0
    cursor: str | None = None  # the last contact id of the last finished page
    pages: int = 0
    error: str | None = None


@dataclass
class BulkEnrollInput:
    journey_key: str
    # Set by the API for a one-off job (its row and, for a list, its ledger already exist);
    # None for a scheduled run, which makes its own job id.
    job_id: str | None = None
    segment_key: str | None = None
    schedule_id: str | None = None
    page_size: int = 500
    concurrency: int = 8
    progress: BulkProgress | None = None  # carried across continue-as-new
    pages_per_run: int = 100


@dataclass
class FixBulkAudienceInput:
    job_id: str
    workflow_id: str
    journey_key: str
    segment_key: str | None = None
    schedule_id: str | None = None


@dataclass
class FixBulkAudienceResult:
    total: int


@dataclass
class EnrollPageInput:
    job_id: str
    after: str | None
    page_size: int = 500
    concurrency: int = 8


@dataclass
class EnrollPageResult:
    last_contact_id: str | None
    processed: int
    done: bool
    progress: BulkProgress = field(default_factory=BulkProgress)


@dataclass
class FinishBulkJobInput:
    job_id: str
    status: str
    error: str | None = None


@dataclass
class BroadcastProgress:
    """What the broadcast's ``progress`` query answers (carried across continue-as-new)."""

    broadcast_id: str = ""
    status: str = "scheduled"  # scheduled | sending | paused | completed | cancelled | failed
    status_reason: str | None = None
    total: int | None = None
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    # Zone groups still to send, each released at its own moment (local-time delivery).
    groups: list[ZoneGroup] = field(default_factory=list)
    tokens: float = 0.0
    refilled_at: str | None = None  # workflow time of the last token refill
    audience_fixed: bool = False


@dataclass
class ZoneGroup:
    zone: str
    release_at: str  # ISO 8601, UTC
    count: int
    cursor: str | None = None
    done: bool = False


@dataclass
class BroadcastInput:
    broadcast_id: str
    send_at: str | None = None  # ISO 8601 with offset; None: now
    local_time: str | None = None  # ISO local date-time, in each contact's zone
    rate_per_second: float = 10.0
    burst: int = 10
    error_policy: str = "skip"  # skip | pause
    progress: BroadcastProgress | None = None
    batches_per_run: int = 500


@dataclass
class FixBroadcastAudienceInput:
    broadcast_id: str
    now: str  # workflow time


@dataclass
class FixBroadcastAudienceResult:
    total: int
    groups: list[ZoneGroup]


@dataclass
class SendBroadcastBatchInput:
    broadcast_id: str
    zone: str
    after: str | None
    limit: int
    now: str  # workflow time: frequency caps count back from it; recorded as released_at
    stop_on_rejection: bool = False  # error policy "pause"


@dataclass
class SendBroadcastBatchResult:
    last_contact_id: str | None
    attempted: int  # how many recipients were taken (each may have reached the provider)
    done: bool  # nothing pending left in this zone
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    rejected: str | None = None  # a provider rejection that stopped the batch (policy pause)


@dataclass
class FailRecipientsInput:
    broadcast_id: str
    zone: str
    reason: str


@dataclass
class SetBroadcastStatusInput:
    broadcast_id: str
    status: str
    reason: str | None = None


@dataclass
class BroadcastControl:
    """A pause or resume (signal), with an optional reason."""

    reason: str | None = None
