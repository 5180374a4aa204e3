from __future__ import annotations

import uuid
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, status
from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.schemas import EnrollmentPublic, StepRecordPublic
from models.contracts import JourneyStateView
from models.tables import Enrollment, Journey, JourneyVersion
from settings import Settings
from workflows.journey import JourneyWorkflow

router = APIRouter(prefix="/enrollments", tags=["enrollments"])


async def enrollment_public(
    session: SessionDep, settings: Settings, enrollment: Enrollment
) -> EnrollmentPublic:
    journey = await session.get(Journey, enrollment.journey_id)
    version = await session.get(JourneyVersion, enrollment.journey_version_id)
    assert journey is not None and version is not None
    return EnrollmentPublic(
        id=enrollment.id,
        journey=journey.key,
        journey_version=version.version,
        contact_id=enrollment.contact_id,
        workflow_id=enrollment.workflow_id,
        status=enrollment.status,
        exit_reason=enrollment.exit_reason,
        started_at=enrollment.started_at,
        ended_at=enrollment.ended_at,
        temporal_ui_url=(
            f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}"
            f"/workflows/{quote(enrollment.workflow_id, safe='')}"
        ),
    )


@router.get("/{enrollment_id}", response_model=EnrollmentPublic)
async def get_enrollment(
    enrollment_id: uuid.UUID, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> EnrollmentPublic:
    """An enrollment with its current step and history, read from the workflow itself."""
    enrollment = await session.get(Enrollment, enrollment_id)
    if enrollment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no enrollment with id {enrollment_id}")
    result = await enrollment_public(session, settings, enrollment)
    handle = temporal.get_workflow_handle_for(JourneyWorkflow.run, enrollment.workflow_id)
    try:
        view: JourneyStateView = await handle.query(JourneyWorkflow.state_view)
    except (RPCError, WorkflowQueryFailedError) as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"enrollment {enrollment_id} is stored, but its workflow could not be read: {err}",
        ) from None
    result.status = view.status if view.status != "active" else result.status
    result.current_step = view.current_step
    result.exit_reason = view.exit_reason or result.exit_reason
    result.history = [StepRecordPublic.model_validate(r.__dict__) for r in view.history]
    return result
