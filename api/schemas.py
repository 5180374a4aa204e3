"""Request and response bodies of the REST API (v1)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.journey import check_timezone

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def normalise_email(value: str) -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized.lower()
    except EmailNotValidError as err:
        raise ValueError(f"invalid email address {value!r}: {err}") from None


def normalise_phone(value: str) -> str:
    digits = re.sub(r"[\s().-]", "", value)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    if not E164.match(digits):
        raise ValueError(f"invalid phone number {value!r}: use E.164, e.g. +14155550123")
    return digits


class ContactRef(_Body):
    """Which contact: by id, email or external id (exactly one)."""

    contact_id: uuid.UUID | None = None
    email: str | None = None
    external_id: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return normalise_email(value) if value is not None else None

    @model_validator(mode="after")
    def _one_ref(self) -> ContactRef:
        given = [n for n in ("contact_id", "email", "external_id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("name the contact by exactly one of contact_id, email, external_id")
        return self


class _ContactFields(_Body):
    """The contact fields a client may set, validated and normalised (upsert and patch)."""

    email: str | None = None
    external_id: str | None = Field(default=None, min_length=1, max_length=200)
    phone: str | None = None
    timezone: str | None = None
    lifecycle_stage: str | None = Field(default=None, min_length=1, max_length=32)
    tags: list[str] | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return normalise_email(value) if value is not None else None

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalise_phone(value) if value is not None else None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_timezone(value)


class ContactUpsert(_ContactFields):
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="Merged into the stored attributes; null deletes a key."
    )

    @model_validator(mode="after")
    def _identified(self) -> ContactUpsert:
        if self.email is None and self.external_id is None:
            raise ValueError("a contact needs an email or an external_id")
        return self


class ContactPublic(BaseModel):
    id: uuid.UUID
    email: str | None
    phone: str | None
    external_id: str | None
    timezone: str | None
    lifecycle_stage: str
    score: int
    tags: list[str]
    attributes: dict[str, Any]
    email_status: str
    sms_status: str
    created_at: datetime
    updated_at: datetime


class ContactUpsertResult(BaseModel):
    created: bool
    contact: ContactPublic


class EventIn(ContactRef):
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Idempotency id: the same id twice is stored (and delivered) once. "
        "Omitted: one is generated, and a retry would count twice.",
    )
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    properties: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = None

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("occurred_at needs a time zone offset, e.g. 2026-11-22T09:00:00Z")
        return value


class EventAccepted(BaseModel):
    event_id: uuid.UUID
    idempotency_id: str
    duplicate: bool
    delivered_to: int


class TemplateIn(_Body):
    channel: str = Field(pattern="^(email|sms)$")
    subject: str | None = Field(default=None, max_length=998)
    html: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _parts(self) -> TemplateIn:
        if self.channel == "email" and not self.subject:
            raise ValueError("an email template needs a subject")
        if self.channel == "email" and not (self.html or self.text):
            raise ValueError("an email template needs html or text")
        if self.channel == "sms" and not self.text:
            raise ValueError("an SMS template needs text")
        return self


class PreviewIn(ContactRef):
    """Render a template as this contact would see it."""

    trigger: dict[str, Any] | None = Field(
        default=None, description="Event data the template sees as `trigger`."
    )
    journey: str | None = Field(default=None, description="Journey key the template sees.")


class PreviewOut(BaseModel):
    channel: str
    subject: str | None
    html: str | None
    text: str | None


class TemplatePublic(BaseModel):
    key: str
    channel: str
    subject: str | None
    html: str | None
    text: str | None
    updated_at: datetime


class JourneyPublic(BaseModel):
    key: str
    name: str
    status: str
    current_version: int | None
    draft: dict[str, Any]
    updated_at: datetime


class JourneyVersionPublic(BaseModel):
    key: str
    version: int
    document: dict[str, Any]
    published_at: datetime
    # enroll_on_publish: the bulk enrollment of the trigger segment's members it started.
    bulk_enrollment_id: uuid.UUID | None = None


class JourneyStatusResult(BaseModel):
    key: str
    status: str
    enrollments_signalled: int


class EnrollIn(ContactRef):
    trigger: dict[str, Any] | None = Field(
        default=None, description="Event data templates and conditions see as `trigger`."
    )


class StepRecordPublic(BaseModel):
    step_id: str
    step_type: str
    entered_at: str
    outcome: str | None
    left_at: str | None


class StepChoicePublic(BaseModel):
    kind: str  # send_time | channel | split
    choice: str
    reason: str
    decided_at: str


class EnrollmentPublic(BaseModel):
    id: uuid.UUID
    journey: str
    journey_version: int
    contact_id: uuid.UUID
    workflow_id: str
    status: str
    exit_reason: str | None
    started_at: datetime
    ended_at: datetime | None
    goal: str | None = None
    variant: str | None = None
    run_key: str = ""
    current_step: str | None = None
    waiting_for: str | None = None
    next_wakeup: str | None = None
    history: list[StepRecordPublic] = Field(default_factory=list)
    # Per step: what best_time, channel: best or a winner-test split chose, and why.
    choices: dict[str, StepChoicePublic] = Field(default_factory=dict)
    temporal_ui_url: str | None = None


class MoveIn(_Body):
    """An operator's move: ``goto`` a step, or ``exit`` the journey."""

    action: str = Field(pattern="^(goto|exit)$")
    step: str | None = None
    reason: str | None = Field(default=None, max_length=200)


class EnrollResult(BaseModel):
    created: bool
    enrollment: EnrollmentPublic


class ContactUpdate(_ContactFields):
    """A partial update: only the fields given change. ``null`` clears email, external_id,
    phone or timezone; in ``attributes`` it deletes a key."""

    attributes: dict[str, Any] | None = Field(
        default=None, description="Merged into the stored attributes; null deletes a key."
    )

    @model_validator(mode="after")
    def _not_null(self) -> ContactUpdate:
        for name in ("lifecycle_stage", "tags", "attributes"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class ContactPage(BaseModel):
    contacts: list[ContactPublic]
    next: str | None = Field(description="Cursor of the next page (pass as `after`); null: last.")


class ImportRowError(BaseModel):
    row: int = Field(description="1-based data row (CSV: not counting the header).")
    error: str


class ImportResult(BaseModel):
    received: int
    created: int
    updated: int
    rejected: int
    errors: list[ImportRowError] = Field(description="The first 1000 rejected rows, in order.")


class ErasureResult(BaseModel):
    erased: bool
    journeys_ended: int
    events_anonymised: int
    messages_scrubbed: int
    outbox_files_removed: int
