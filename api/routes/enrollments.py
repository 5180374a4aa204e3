from __future__ import annotations

import uuid
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, status
from temporalio.client import WorkflowHandle, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.service import RPCError

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.schemas import EnrollmentPublic, MoveIn, StepChoicePublic, StepRecordPublic
from models.contracts import ControlRequest, JourneyResult, JourneyStateView
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
    run = f"/{enrollment.run_id}" if enrollment.run_id else ""
    return EnrollmentPublic(
        id=enrollment.id,
        journey=journey.key,
        journey_version=version.version,
        contact_id=enrollment.contact_id,
        workflow_id=enrollment.workflow_id,
        status=enrollment.status,
        exit_reason=enrollment.exit_reason,
        goal=enrollment.goal,
        variant=enrollment.variant,
        run_key=enrollment.run_key,
        started_at=enrollment.started_at,
        ended_at=enrollment.ended_at,
        temporal_ui_url=(
            f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}"
            f"/workflows/{quote(enrollment.workflow_id, safe='')}{run}"
        ),
    )


async def _enrollment(session: SessionDep, enrollment_id: uuid.UUID) -> Enrollment:
    enrollment = await session.get(Enrollment, enrollment_id)
    if enrollment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no enrollment with id {enrollment_id}")
    return enrollment


def _handle(
    temporal: TemporalDep, enrollment: Enrollment
) -> WorkflowHandle[JourneyWorkflow, JourneyResult]:
    # The run id pins this enrollment's own run when re-entry reused the workflow id.
    return temporal.get_workflow_handle_for(
        JourneyWorkflow.run, enrollment.workflow_id, run_id=enrollment.run_id
    )


@router.get("/{enrollment_id}", response_model=EnrollmentPublic)
async def get_enrollment(
    enrollment_id: uuid.UUID, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> EnrollmentPublic:
    """An enrollment with its current step, what it waits for and the path taken, read
    from the workflow itself."""
    enrollment = await _enrollment(session, enrollment_id)
    result = await enrollment_public(session, settings, enrollment)
    try:
        view: JourneyStateView = await _handle(temporal, enrollment).query(
            JourneyWorkflow.state_view
        )
    except (RPCError, WorkflowQueryFailedError) as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"enrollment {enrollment_id} is stored, but its workflow could not be read: {err}",
        ) from None
    result.status = view.status if view.status != "active" else result.status
    result.current_step = view.current_step
    result.exit_reason = view.exit_reason or result.exit_reason
    result.goal = view.goal or result.goal
    result.variant = view.variant or result.variant
    result.waiting_for = view.waiting_for
    result.next_wakeup = view.next_wakeup
    result.history = [StepRecordPublic.model_validate(r.__dict__) for r in view.history]
    result.choices = {
        step: StepChoicePublic.model_validate(c.__dict__) for step, c in view.choices.items()
    }
    return result


@router.post("/{enrollment_id}/move", response_model=EnrollmentPublic)
async def move_enrollment(
    enrollment_id: uuid.UUID,
    body: MoveIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> EnrollmentPublic:
    """Move the contact to a step (``goto``) or end its journey early (``exit``)."""
    enrollment = await _enrollment(session, enrollment_id)
    try:
        await _handle(temporal, enrollment).execute_update(
            JourneyWorkflow.move, ControlRequest(body.action, body.step, body.reason)
        )
    except WorkflowUpdateFailedError as err:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"enrollment {enrollment_id}: {err.cause or err}"
        ) from None
    except RPCError as err:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"enrollment {enrollment_id} cannot be moved: {err}"
        ) from None
    return await enrollment_public(session, settings, enrollment)
