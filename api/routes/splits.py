"""A/B winner tests: how a split with a ``metric`` is doing, and what it decided."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel
from sqlalchemy import text
from sqlmodel import select

from api.deps import SessionDep
from api.services import get_journey
from models.journey import KEY_PATTERN, STEP_ID_PATTERN, SplitStep, parse_journey
from models.tables import JourneyVersion, SplitTest, utcnow

router = APIRouter(prefix="/journeys", tags=["journeys"])

# Per variant, every contact so far: how many entered, and how many succeeded within the
# observation time (those still inside it may yet succeed).
_LIVE = text(
    """
    SELECT a.variant,
           count(*) AS assigned,
           count(*) FILTER (WHERE a.assigned_at + :observe <= :now) AS observed,
           count(*) FILTER (WHERE EXISTS (
               SELECT 1 FROM events e
               WHERE e.contact_id = a.contact_id AND e.name = ANY(:names)
                 AND e.occurred_at >= a.assigned_at
                 AND e.occurred_at <= a.assigned_at + :observe)) AS successes
    FROM split_assignments a
    WHERE a.split_test_id = :test
    GROUP BY a.variant
    """
)


class VariantResult(BaseModel):
    variant: str
    weight: int
    goto: str
    assigned: int
    observed: int
    successes: int
    rate: float | None


class DecisionVariant(BaseModel):
    observed: int
    successes: int
    rate: float


class SplitResults(BaseModel):
    journey: str
    step: str
    metric: str
    test_size: int
    confidence: float
    observe: str
    success_events: list[str]
    status: str  # testing | winner | no_difference
    winner: str | None = None
    p_value: float | None = None
    decided_at: datetime | None = None
    decision: dict[str, DecisionVariant] = {}
    variants: list[VariantResult]


@router.get("/{key}/splits/{step}", response_model=SplitResults)
async def split_results(
    key: Annotated[str, Path(pattern=KEY_PATTERN)],
    step: Annotated[str, Path(pattern=STEP_ID_PATTERN)],
    session: SessionDep,
) -> SplitResults:
    """A winner-test split of the journey's current version: per-variant counts and rates
    so far, and the decision (winner or no difference, p-value, when) once made."""
    journey = await get_journey(session, key)
    if journey.current_version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"journey {key!r} is not published")
    version = (
        await session.exec(
            select(JourneyVersion)
            .where(JourneyVersion.journey_id == journey.id)
            .where(JourneyVersion.version == journey.current_version)
        )
    ).one()
    document = parse_journey(version.document)
    split = next((s for s in document.steps if s.id == step), None)
    if not isinstance(split, SplitStep) or split.metric is None or split.test_size is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"journey {key!r} (version {journey.current_version}) has no split step {step!r} "
            "with a metric",
        )
    names = {
        "open": ["email_opened", "email_clicked"],
        "click": ["email_clicked"],
        "conversion": document.goals(),
    }[split.metric]
    test = (
        await session.exec(
            select(SplitTest).where(SplitTest.journey_key == key).where(SplitTest.step_id == step)
        )
    ).first()
    live: dict[str, tuple[int, int, int]] = {}
    if test is not None:
        rows = (
            await (await session.connection()).execute(
                _LIVE,
                {"test": test.id, "observe": split.observe_delta, "now": utcnow(), "names": names},
            )
        ).all()
        live = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}
    variants = []
    for v in split.variants:
        assigned, observed, successes = live.get(v.variant, (0, 0, 0))
        variants.append(
            VariantResult(
                variant=v.variant,
                weight=v.weight,
                goto=v.goto,
                assigned=assigned,
                observed=observed,
                successes=successes,
                rate=successes / assigned if assigned else None,
            )
        )
    return SplitResults(
        journey=key,
        step=step,
        metric=split.metric,
        test_size=split.test_size,
        confidence=split.confidence_level,
        observe=split.observe or "1d",
        success_events=names,
        status=test.status if test else "testing",
        winner=test.winner if test else None,
        p_value=test.p_value if test else None,
        decided_at=test.decided_at if test else None,
        decision={k: DecisionVariant.model_validate(v) for k, v in test.stats.items()}
        if test
        else {},
        variants=variants,
    )
