"""The journey document: a validated, versioned description of a nurture program.

Validation errors name the step and the field (see ``describe_errors``).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, available_timezones

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from models.conditions import Condition, PropCondition
from models.durations import parse_duration
from models.schedule import Window, moment_at, parse_clock, parse_weekdays

KEY_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
STEP_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Read once at import: inside the workflow sandbox the zone database is not listable.
KNOWN_TIMEZONES = frozenset(available_timezones())


def check_timezone(value: str | None) -> str | None:
    """The zone name, if IANA knows it (None passes); the one check every input uses."""
    if value is not None and value not in KNOWN_TIMEZONES:
        raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Paris)")
    return value


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


def _check_offset(value: str | None) -> str | None:
    if value is not None:
        parse_offset(value)
    return value


def parse_offset(text: str) -> timedelta:
    """A signed duration: ``-1d``, ``+2h``, ``30m``."""
    sign = -1 if text.startswith("-") else 1
    return sign * parse_duration(text.lstrip("+-"))


def _check_clock(value: str | None) -> str | None:
    if value is not None:
        parse_clock(value)
    return value


def _check_weekdays(value: list[str] | None) -> list[str] | None:
    if value is not None:
        parse_weekdays(value)
    return value


class _Step(_Doc):
    id: str = Field(pattern=STEP_ID_PATTERN)
    label: str | None = Field(default=None, max_length=120, description="Plain-words name.")

    def targets(self) -> list[str]:
        """Ids of the steps this step can jump to (besides the next one)."""
        return []


class UntilClock(_Doc):
    """A local time of day on allowed weekdays (``{time: "09:00", weekdays: [mon]}``)."""

    time: str
    weekdays: list[str] | None = None

    _time = field_validator("time")(_check_clock)
    _weekdays = field_validator("weekdays")(_check_weekdays)


class UntilAt(_Doc):
    """An absolute moment, in the contact's zone unless it carries an offset."""

    at: str

    @field_validator("at", mode="before")
    @classmethod
    def _moment(cls, value: Any) -> str:
        text = value.isoformat() if isinstance(value, datetime | date) else str(value)
        moment_at(text, ZoneInfo("UTC"))
        return text


class UntilDate(_Doc):
    """A date from a contact attribute or a trigger-event property, with an offset."""

    attr: str | None = Field(default=None, min_length=1)
    prop: str | None = Field(default=None, min_length=1)
    offset: str | None = None
    time: str | None = None
    yearly: bool = False

    _offset = field_validator("offset")(_check_offset)
    _time = field_validator("time")(_check_clock)

    @model_validator(mode="after")
    def _one_source(self) -> UntilDate:
        if (self.attr is None) == (self.prop is None):
            raise ValueError("until needs exactly one of attr, prop")
        return self


def _until_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        if "at" in value:
            return "at"
        if "attr" in value or "prop" in value:
            return "date"
        if "time" in value:
            return "time"
    return None


Until = Annotated[
    Annotated[UntilClock, Tag("time")]
    | Annotated[UntilAt, Tag("at")]
    | Annotated[UntilDate, Tag("date")],
    Discriminator(
        _until_kind,
        custom_error_type="unknown_until",
        custom_error_message="until needs one of: time (+ weekdays), at, attr or prop",
    ),
]


class WaitStep(_Step):
    type: Literal["wait"]
    duration: str | None = None
    until: Until | None = None
    best_time: bool | None = Field(
        default=None,
        description="Wait for the contact's usual engagement hour (the journey's send_time "
        "when its history is too thin).",
    )

    _duration = field_validator("duration")(_check_duration)

    @model_validator(mode="after")
    def _one_kind(self) -> WaitStep:
        kinds = (self.duration is not None) + (self.until is not None) + (self.best_time is True)
        if kinds != 1:
            raise ValueError("a wait needs exactly one of duration, until, best_time")
        return self

    @property
    def delay(self) -> timedelta:
        assert self.duration is not None
        return parse_duration(self.duration)


class SendWindow(_Doc):
    from_: str = Field(alias="from")
    to: str
    weekdays: list[str] | None = None
    outside: Literal["defer", "skip"] = "defer"

    _clocks = field_validator("from_", "to")(_check_clock)
    _weekdays = field_validator("weekdays")(_check_weekdays)

    @model_validator(mode="after")
    def _spans(self) -> SendWindow:
        Window.parse(self.from_, self.to, self.weekdays)
        return self

    @property
    def window(self) -> Window:
        return Window.parse(self.from_, self.to, self.weekdays)


class EmailStep(_Step):
    type: Literal["email"]
    template: str = Field(pattern=KEY_PATTERN)
    subject: str | None = Field(default=None, max_length=998)
    window: SendWindow | None = None
    # channel: best sends by SMS instead when the contact engages more there.
    channel: Literal["best"] | None = None
    sms_template: str | None = Field(default=None, pattern=KEY_PATTERN)

    @model_validator(mode="after")
    def _alternate(self) -> EmailStep:
        _check_alternate(self.channel, self.sms_template, "sms_template")
        return self

    def channel_templates(self) -> dict[str, str]:
        """The template to send on each channel the step may use."""
        found = {"email": self.template}
        if self.sms_template:
            found["sms"] = self.sms_template
        return found


class SmsStep(_Step):
    type: Literal["sms"]
    template: str = Field(pattern=KEY_PATTERN)
    window: SendWindow | None = None
    # channel: best sends by email instead when the contact engages more there.
    channel: Literal["best"] | None = None
    email_template: str | None = Field(default=None, pattern=KEY_PATTERN)

    @model_validator(mode="after")
    def _alternate(self) -> SmsStep:
        _check_alternate(self.channel, self.email_template, "email_template")
        return self

    def channel_templates(self) -> dict[str, str]:
        found = {"sms": self.template}
        if self.email_template:
            found["email"] = self.email_template
        return found


def _check_alternate(channel: str | None, alternate: str | None, field: str) -> None:
    if channel == "best" and alternate is None:
        raise ValueError(f"channel: best needs {field} (the template for the other channel)")
    if channel is None and alternate is not None:
        raise ValueError(f"{field} is only used with channel: best")


class WaitForStep(_Step):
    type: Literal["wait_for"]
    event: str | None = Field(default=None, min_length=1, max_length=200)
    where: Condition | None = None
    condition: Condition | None = None
    timeout: str | None = None
    on_event: str | None = None
    on_timeout: str | None = None

    _timeout = field_validator("timeout")(_check_duration)

    @model_validator(mode="after")
    def _shape(self) -> WaitForStep:
        if (self.event is None) == (self.condition is None):
            raise ValueError("wait_for needs exactly one of event, condition")
        if self.where is not None and self.event is None:
            raise ValueError("where filters an event: give event too")
        if self.on_timeout is not None and self.timeout is None:
            raise ValueError("on_timeout needs a timeout")
        return self

    @property
    def timeout_delta(self) -> timedelta | None:
        return parse_duration(self.timeout) if self.timeout else None

    def targets(self) -> list[str]:
        return [t for t in (self.on_event, self.on_timeout) if t]


class BranchCase(_Doc):
    if_: Condition = Field(alias="if")
    goto: str


class BranchStep(_Step):
    type: Literal["branch"]
    cases: list[BranchCase] = Field(min_length=1)
    else_: str | None = Field(default=None, alias="else")

    def targets(self) -> list[str]:
        return [c.goto for c in self.cases] + ([self.else_] if self.else_ else [])


class SplitVariant(_Doc):
    weight: int = Field(gt=0, le=1_000_000)
    goto: str
    name: str | None = Field(default=None, pattern=STEP_ID_PATTERN)

    @property
    def variant(self) -> str:
        return self.name or self.goto


class SplitStep(_Step):
    """Weighted A/B/n; with a ``metric`` and ``test_size`` it picks a winner (see
    activities/optimisation.py for the statistical rule)."""

    type: Literal["split"]
    variants: list[SplitVariant] = Field(min_length=2, max_length=26)
    metric: Literal["open", "click", "conversion"] | None = None
    test_size: int | None = Field(
        default=None, ge=2, le=1_000_000, description="Observed contacts per variant."
    )
    confidence: float | None = Field(default=None, ge=0.5, le=0.999, description="Default 0.95.")
    observe: str | None = Field(
        default=None,
        description="How long after entering the split a contact is watched (default 1d).",
    )

    _observe = field_validator("observe")(_check_duration)

    @model_validator(mode="after")
    def _distinct(self) -> SplitStep:
        names = [v.variant for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variants need distinct names (name, or goto when unnamed)")
        if (self.metric is None) != (self.test_size is None):
            raise ValueError("a winner test needs both metric and test_size")
        if self.metric is None and (self.confidence is not None or self.observe is not None):
            raise ValueError("confidence and observe belong to a winner test: give metric too")
        return self

    @property
    def observe_delta(self) -> timedelta:
        return parse_duration(self.observe or "1d")

    @property
    def confidence_level(self) -> float:
        return 0.95 if self.confidence is None else self.confidence

    def targets(self) -> list[str]:
        return [v.goto for v in self.variants]


class UpdateContactStep(_Step):
    type: Literal["update_contact"]
    set: dict[str, Any] = Field(default_factory=dict)
    add_tags: list[str] = Field(default_factory=list)
    remove_tags: list[str] = Field(default_factory=list)
    score: int | None = Field(default=None, description="Added to the contact's score.")
    lifecycle_stage: str | None = Field(default=None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _something(self) -> UpdateContactStep:
        if not (
            self.set or self.add_tags or self.remove_tags or self.score or self.lifecycle_stage
        ):
            raise ValueError(
                "update_contact needs set, add_tags, remove_tags, score or lifecycle_stage"
            )
        protected = set(self.set) & {"email", "phone", "external_id", "score", "tags"}
        if protected:
            raise ValueError(f"set may not change {', '.join(sorted(protected))}")
        return self


class CrmStep(_Step):
    type: Literal["crm"]
    action: Literal["create_task", "update_contact"]
    note: str | None = Field(default=None, max_length=2000)
    due_in: str | None = None
    owner: str | None = Field(default=None, max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)

    _due = field_validator("due_in")(_check_duration)

    @model_validator(mode="after")
    def _shape(self) -> CrmStep:
        if self.action == "create_task" and not self.note:
            raise ValueError("create_task needs a note")
        if self.action == "update_contact" and not self.properties:
            raise ValueError("update_contact needs properties")
        return self


class WebhookStep(_Step):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://[^\s/$.?#][^\s]*$", max_length=2000)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class EnrollStep(_Step):
    type: Literal["enroll"]
    journey: str = Field(pattern=KEY_PATTERN)


class GotoStep(_Step):
    type: Literal["goto"]
    step: str

    def targets(self) -> list[str]:
        return [self.step]


class ExitStep(_Step):
    type: Literal["exit"]


Step = Annotated[
    WaitStep
    | EmailStep
    | SmsStep
    | WaitForStep
    | BranchStep
    | SplitStep
    | UpdateContactStep
    | CrmStep
    | WebhookStep
    | EnrollStep
    | GotoStep
    | ExitStep,
    Field(discriminator="type"),
]

STEP_TYPES = (
    "wait", "email", "sms", "wait_for", "branch", "split", "update_contact",
    "crm", "webhook", "enroll", "goto", "exit",
)  # fmt: skip
# Steps whose next move does not wait on anything (a loop of only these never ends).
INSTANT_STEPS = ("branch", "split", "update_contact", "crm", "webhook", "enroll", "goto", "exit")


SEGMENT_ENTERED = "segment_entered"
SEGMENT_EXITED = "segment_exited"


class Trigger(_Doc):
    """How contacts enter besides the API: on an event (with ``where``), one run per ``key``;
    or on entering a segment (the ``segment_entered`` event of that segment)."""

    event: str | None = Field(default=None, min_length=1, max_length=200)
    where: Condition | None = None
    key: str | None = Field(default=None, min_length=1, max_length=200)
    segment: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")

    @model_validator(mode="after")
    def _shape(self) -> Trigger:
        if self.segment is not None:
            if self.event is not None or self.key is not None:
                raise ValueError("a segment trigger takes no event or key")
            return self
        if self.event is None:
            raise ValueError("a trigger needs an event or a segment")
        return self

    @property
    def event_name(self) -> str:
        """The event that starts a run: the named one, or entering the segment."""
        return self.event if self.event is not None else SEGMENT_ENTERED

    def matches(self, properties: dict[str, object]) -> bool:
        """Whether an event named ``event_name`` with these properties is for this trigger
        (``where`` aside)."""
        return self.segment is None or properties.get("segment") == self.segment


class ReentryAfter(_Doc):
    after: str

    _after = field_validator("after")(_check_duration)


class SendTime(_Doc):
    """When ``best_time`` waits for a contact with too little history, and how much counts."""

    time: str = "10:00"
    weekdays: list[str] | None = Field(default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"])
    lookback: str = "90d"
    min_engagements: int = Field(default=3, ge=1, le=10_000)

    _time = field_validator("time")(_check_clock)
    _weekdays = field_validator("weekdays")(_check_weekdays)
    _lookback = field_validator("lookback")(_check_duration)


class JourneyDocument(_Doc):
    key: str = Field(pattern=KEY_PATTERN, description="Stable identifier, [a-z0-9-].")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    default_timezone: str | None = None
    trigger: Trigger | None = None
    enroll_on_publish: bool = False
    reentry: Literal["never", "after_exit"] | ReentryAfter = "never"
    exit_when: Condition | None = None
    send_time: SendTime | None = Field(
        default=None, description="best_time's fallback and thresholds (defaults: SendTime())."
    )
    steps: list[Step] = Field(min_length=1, max_length=500)

    @field_validator("default_timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        return check_timezone(value)

    @model_validator(mode="after")
    def _steps_link_up(self) -> JourneyDocument:
        if self.enroll_on_publish and (self.trigger is None or self.trigger.segment is None):
            raise ValueError("enroll_on_publish needs a segment trigger")
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"step {step.id!r}: id is used by another step")
            seen.add(step.id)
        for step in self.steps:
            for target in step.targets():
                if target not in seen:
                    raise ValueError(f"step {step.id!r}: goes to unknown step {target!r}")
            if isinstance(step, WaitForStep) and step.where is not None:
                _only_props(f"step {step.id!r}", step.where)
            if isinstance(step, EnrollStep) and step.journey == self.key:
                raise ValueError(f"step {step.id!r}: a journey may not enroll into itself")
            if isinstance(step, SplitStep) and step.metric == "conversion" and not self.goals():
                raise ValueError(
                    f"step {step.id!r}: metric conversion counts the journey's goal events; "
                    "give exit_when an {event: ...} goal"
                )
        if self.trigger is not None and self.trigger.where is not None:
            _only_props("trigger", self.trigger.where)
        return self

    @property
    def cooldown(self) -> timedelta | None:
        return (
            parse_duration(self.reentry.after) if isinstance(self.reentry, ReentryAfter) else None
        )

    def index_of(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(step_id)

    def templates(self) -> dict[str, set[str]]:
        """Template keys the journey sends, by channel."""
        found: dict[str, set[str]] = {"email": set(), "sms": set()}
        for step in self.steps:
            if isinstance(step, EmailStep | SmsStep):
                for channel, template in step.channel_templates().items():
                    found[channel].add(template)
        return found

    @property
    def send_time_rule(self) -> SendTime:
        return self.send_time or SendTime()

    def goals(self) -> list[str]:
        """Names of the events in ``exit_when`` (what a split's conversion counts)."""
        found: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                if isinstance(value.get("event"), str) and value["event"] not in found:
                    found.append(value["event"])
                for item in value.values():
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        if self.exit_when is not None:
            walk(self.exit_when.model_dump(by_alias=True, exclude_none=True))
        return found

    def journeys(self) -> set[str]:
        return {s.journey for s in self.steps if isinstance(s, EnrollStep)}

    def segments(self) -> set[str]:
        """Segment keys the journey names: its trigger and every ``{segment}`` condition."""
        found: set[str] = set()

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                if isinstance(value.get("segment"), str):
                    found.add(value["segment"])
                for item in value.values():
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        walk(self.model_dump(by_alias=True, exclude_none=True))
        return found


def _only_props(label: str, condition: Any) -> None:
    """``where`` filters an event by its properties; attributes belong in a branch."""
    if isinstance(condition, PropCondition):
        return
    children = (
        getattr(condition, "all", None)
        or getattr(condition, "any", None)
        or [getattr(condition, "not_", None)]
    )
    for child in children:
        if child is None or not hasattr(child, "model_fields"):
            raise ValueError(f"{label}: where may only test event properties (prop)")
        _only_props(label, child)


class JourneyValidationError(ValueError):
    """A journey document that does not validate, with one message per problem."""

    def __init__(self, problems: list[dict[str, Any]]):
        self.problems = problems
        super().__init__("; ".join(p["message"] for p in problems))


def describe_errors(raw: Any, error: ValidationError) -> list[dict[str, Any]]:
    """Turn Pydantic's errors into messages naming the step (by id) and the field."""
    steps = raw.get("steps") if isinstance(raw, dict) else None
    problems = []
    for err in error.errors():
        loc = list(err["loc"])
        step_id = None
        where = []
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            index = loc[1]
            if isinstance(steps, list) and index < len(steps) and isinstance(steps[index], dict):
                step_id = steps[index].get("id")
            # Drop the union tag Pydantic puts after the index (e.g. 'wait_for').
            rest = loc[2:]
            if rest and rest[0] in STEP_TYPES:
                rest = rest[1:]
            where.append(f"steps[{index}]" + (f" (id {step_id!r})" if step_id else ""))
            field = ".".join(str(p) for p in rest)
        else:
            field = ".".join(str(p) for p in loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("union_tag_invalid", "union_tag_not_found") and not field:
            message = f"unknown step type; use one of: {', '.join(STEP_TYPES)}"
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        text = " ".join([*where, field]).strip()
        problems.append(
            {
                "step": step_id,
                "field": field or None,
                "message": f"{text}: {message}" if text else message,
            }
        )
    return problems


def parse_journey(raw: Any) -> JourneyDocument:
    """Validate a journey document (already decoded from JSON or YAML)."""
    if not isinstance(raw, dict):
        raise JourneyValidationError(
            [{"step": None, "field": None, "message": "a journey document must be an object"}]
        )
    try:
        return JourneyDocument.model_validate(raw)
    except ValidationError as exc:
        raise JourneyValidationError(describe_errors(raw, exc)) from None
