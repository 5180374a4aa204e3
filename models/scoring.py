"""Lead scoring: rules that give points, and lifecycle stages advanced by score thresholds.

A contact's score is its ``score_adjustment`` (deltas from ``update_contact`` steps and the
API) plus the points of every rule, recomputed in SQL by the audience refresh
(``activities.audience``):

- an **event rule** gives ``points`` for each of the contact's events named ``event``
  (matching ``where``), counting only the last ``within`` if given; with ``half_life``
  each event's points halve every ``half_life`` of age (decay); ``max_points`` caps the
  rule's total (by magnitude, so negative rules work too);
- a **condition rule** gives ``points`` once while its ``if`` holds (profile, segments,
  behaviour: the condition language).

Stages only move forward by score: a contact whose score reaches a stage's threshold and
who is at an earlier stage moves to it, and that is a ``became_<stage>`` event (e.g.
``became_mql``) a journey can trigger on to hand the lead to sales.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.conditions import Condition
from models.durations import parse_duration

LIFECYCLE_STAGES = (
    "subscriber", "lead", "mql", "sql", "opportunity", "customer", "evangelist",
)  # fmt: skip


def stage_rank(stage: str | None) -> int:
    """Position in the lifecycle; an unknown or custom stage ranks with ``subscriber``."""
    return LIFECYCLE_STAGES.index(stage) if stage in LIFECYCLE_STAGES else 0


def became_event(stage: str) -> str:
    return f"became_{stage}"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


class ScoringRule(_Doc):
    name: str = Field(min_length=1, max_length=100)
    event: str | None = Field(default=None, min_length=1, max_length=200)
    where: Condition | None = None
    if_: Condition | None = Field(default=None, alias="if")
    points: int = Field(ge=-10_000, le=10_000)
    max_points: int | None = Field(default=None, ge=1)
    within: str | None = None
    half_life: str | None = None

    _durations = field_validator("within", "half_life")(_duration)

    @model_validator(mode="after")
    def _one_kind(self) -> ScoringRule:
        if (self.event is None) == (self.if_ is None):
            raise ValueError(f"rule {self.name!r}: give either event or if")
        if self.if_ is not None and (
            self.where or self.within or self.half_life or self.max_points
        ):
            raise ValueError(
                f"rule {self.name!r}: where, within, half_life and max_points apply to "
                "event rules only"
            )
        if self.half_life is not None and self.half_life_delta <= timedelta(0):
            raise ValueError(f"rule {self.name!r}: half_life must be positive")
        return self

    @property
    def window(self) -> timedelta | None:
        return parse_duration(self.within) if self.within else None

    @property
    def half_life_delta(self) -> timedelta:
        return parse_duration(self.half_life) if self.half_life else timedelta(0)


class ScoringModelDocument(_Doc):
    rules: list[ScoringRule] = Field(default_factory=list, max_length=200)
    thresholds: dict[str, int] = Field(
        default_factory=dict,
        description="Lowest score of each lifecycle stage reached by score, e.g. "
        "{lead: 10, mql: 50, sql: 100}.",
    )

    @field_validator("thresholds")
    @classmethod
    def _stages_in_order(cls, value: dict[str, int]) -> dict[str, int]:
        for stage in value:
            if stage not in LIFECYCLE_STAGES[1:]:
                raise ValueError(
                    f"unknown lifecycle stage {stage!r}; stages are "
                    + ", ".join(LIFECYCLE_STAGES[1:])
                )
        ordered = sorted(value.items(), key=lambda item: stage_rank(item[0]))
        for (low, low_score), (high, high_score) in itertools.pairwise(ordered):
            if high_score <= low_score:
                raise ValueError(
                    f"threshold of {high!r} ({high_score}) must be above {low!r} ({low_score})"
                )
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ScoringModelDocument:
        names = [rule.name for rule in self.rules]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"rule name {name!r} is used twice")
        return self

    def stage_for(self, score: int) -> str | None:
        """The furthest stage this score reaches by threshold, if any."""
        reached = [stage for stage, low in self.thresholds.items() if score >= low]
        return max(reached, key=stage_rank) if reached else None


def parse_scoring(document: dict[str, Any]) -> ScoringModelDocument:
    return ScoringModelDocument.model_validate(document)
