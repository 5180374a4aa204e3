"""Lead scoring: the rules and lifecycle thresholds (see ``models.scoring``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ValidationError

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.services import dispatch_contact_changes
from models.scoring import LIFECYCLE_STAGES, ScoringModelDocument
from models.tables import ScoringModel, utcnow

router = APIRouter(prefix="/scoring", tags=["scoring"])


class ScoringPublic(BaseModel):
    document: dict[str, Any]
    stages: list[str]
    updated_at: datetime | None


class ScoringApplied(ScoringPublic):
    scores_changed: int
    stages_advanced: int


@router.get("", response_model=ScoringPublic)
async def get_scoring(session: SessionDep) -> ScoringPublic:
    row = await session.get(ScoringModel, "default")
    return ScoringPublic(
        document=row.document if row else ScoringModelDocument().model_dump(by_alias=True),
        stages=list(LIFECYCLE_STAGES),
        updated_at=row.updated_at if row else None,
    )


@router.put(
    "",
    response_model=ScoringApplied,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ScoringModelDocument.model_json_schema(by_alias=True)
                }
            },
        }
    },
)
async def put_scoring(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ScoringApplied:
    """Replace the scoring rules and thresholds, and rescore every contact at once.

    Contacts whose new score reaches a later stage move to it (``became_<stage>``)."""
    body = await request.body()
    try:
        parsed = json.loads(body)
    except ValueError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the scoring model is not JSON: {err}"
        ) from None
    try:
        json.dumps(parsed, allow_nan=False)
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "the scoring model must be JSON with finite numbers (no NaN or Infinity)",
        ) from None
    try:
        document = ScoringModelDocument.model_validate_json(body)
    except ValidationError as err:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in err.errors()
        ]
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            {"message": "the scoring model is invalid", "errors": problems},
        ) from None
    row = await session.get(ScoringModel, "default", with_for_update=True)
    if row is None:
        row = ScoringModel(key="default")
    row.document = document.model_dump(by_alias=True, exclude_none=True)
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    changes = await dispatch_contact_changes(session, temporal, settings, None)
    await session.refresh(row)
    return ScoringApplied(
        document=row.document,
        stages=list(LIFECYCLE_STAGES),
        updated_at=row.updated_at,
        scores_changed=changes.scores_changed,
        stages_advanced=changes.stages_advanced,
    )
