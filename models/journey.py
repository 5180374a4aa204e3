"""The journey document: a validated, versioned description of a nurture program.

Validation errors name the step and the field (see ``describe_errors``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal
from zoneinfo import available_timezones

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.conditions import Condition, PropCondition
from models.durations import parse_duration

KEY_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
STEP_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Read once at import: inside the workflow sandbox the zone database is not listable.
KNOWN_TIMEZONES = frozenset(available_timezones())


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


class _Step(_Doc):
    id: str = Field(pattern=STEP_ID_PATTERN)
    label: str | None = Field(default=None, max_length=120, description="Plain-words name.")

    def targets(self) -> list[str]:
        """Ids of the steps this step can jump to (besides the next one)."""
        return []


class WaitStep(_Step):
    type: Literal["wait"]
    duration: str

    _duration = field_validator("duration")(_check_duration)

    @property
    def delay(self) -> timedelta:
        return parse_duration(self.duration)


class EmailStep(_Step):
    type: Literal["email"]
    template: str = Field(pattern=KEY_PATTERN)
    subject: str | None = Field(default=None, max_length=998)


class WaitForStep(_Step):
    type: Literal["wait_for"]
    event: str = Field(min_length=1, max_length=200)
    where: Condition | None = None
    timeout: str | None = None
    on_event: str | None = None
    on_timeout: str | None = None

    _timeout = field_validator("timeout")(_check_duration)

    @model_validator(mode="after")
    def _timeout_pairs(self) -> WaitForStep:
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


class GotoStep(_Step):
    type: Literal["goto"]
    step: str

    def targets(self) -> list[str]:
        return [self.step]


class ExitStep(_Step):
    type: Literal["exit"]


Step = Annotated[
    WaitStep | EmailStep | WaitForStep | BranchStep | GotoStep | ExitStep,
    Field(discriminator="type"),
]

STEP_TYPES = ("wait", "email", "wait_for", "branch", "goto", "exit")


class JourneyDocument(_Doc):
    key: str = Field(pattern=KEY_PATTERN, description="Stable identifier, [a-z0-9-].")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    default_timezone: str | None = None
    steps: list[Step] = Field(min_length=1, max_length=500)

    @field_validator("default_timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None and value not in KNOWN_TIMEZONES:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Paris)")
        return value

    @model_validator(mode="after")
    def _steps_link_up(self) -> JourneyDocument:
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
                _only_props(step.id, step.where)
        return self

    def index_of(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(step_id)

    def templates(self) -> set[str]:
        return {s.template for s in self.steps if isinstance(s, EmailStep)}


def _only_props(step_id: str, condition: Any) -> None:
    """``where`` on an event filters event properties; attributes belong in a branch."""
    if isinstance(condition, PropCondition):
        return
    for child in (
        getattr(condition, "all", None)
        or getattr(condition, "any", None)
        or [getattr(condition, "not_", None)]
    ):
        if child is None or not hasattr(child, "model_fields"):
            raise ValueError(f"step {step_id!r}: where may only test event properties (prop)")
        _only_props(step_id, child)


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
        if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
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
