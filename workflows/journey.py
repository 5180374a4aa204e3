"""JourneyWorkflow: walks one contact through one published journey version.

The journey document is data; each step type has one small handler. The workflow
does no I/O: contacts are read and messages sent by activities.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.contacts import ContactActivities
    from activities.email import EmailActivities
    from activities.enrollments import EnrollmentActivities
    from models.conditions import evaluate
    from models.contracts import (
        SA_STATUS,
        SA_STEP,
        ContactSnapshot,
        EventSignal,
        FinishEnrollmentInput,
        JourneyInput,
        JourneyResult,
        JourneyState,
        JourneyStateView,
        LoadContactInput,
        SendEmailInput,
        StepRecord,
    )
    from models.durations import format_duration
    from models.journey import (
        BranchStep,
        EmailStep,
        ExitStep,
        GotoStep,
        Step,
        WaitForStep,
        WaitStep,
        parse_journey,
    )

# Steps taken in a row without waiting before the journey is judged to loop forever.
MAX_STEPS_WITHOUT_WAIT = 200
# Event ids remembered for de-duplication of signals (bounded, carried across continue-as-new).
SEEN_EVENT_IDS = 500

READ_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
)


class _Next:
    """Where the walk goes after a step: the next step, a step by id, or the end."""

    def __init__(self, goto: str | None = None, end: str | None = None, outcome: str = "done"):
        self.goto = goto
        self.end = end
        self.outcome = outcome


@workflow.defn
class JourneyWorkflow:
    @workflow.init
    def __init__(self, input: JourneyInput) -> None:
        self.input = input
        self.document = parse_journey(input.document)
        self.state = input.state or JourneyState()
        self.inbox: list[EventSignal] = []
        self.waiting_since = 0
        self.received = 0
        self.handlers: dict[type, Callable[[Step], Awaitable[_Next]]] = {
            WaitStep: self._wait,  # type: ignore[dict-item]
            EmailStep: self._email,  # type: ignore[dict-item]
            WaitForStep: self._wait_for,  # type: ignore[dict-item]
            BranchStep: self._branch,  # type: ignore[dict-item]
            GotoStep: self._goto,  # type: ignore[dict-item]
            ExitStep: self._exit,  # type: ignore[dict-item]
        }

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        steps_without_wait = 0
        while self.state.status == "active" and self.state.position < len(self.document.steps):
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    JourneyInput(**{**self.input.__dict__, "state": self.state})
                )
            step = self.document.steps[self.state.position]
            self.state.visits[step.id] = self.state.visits.get(step.id, 0) + 1
            self.state.steps_taken += 1
            record = StepRecord(step.id, step.type, workflow.now().isoformat())
            self.state.history.append(record)
            del self.state.history[:-100]
            self._show(step)

            self.inbox.clear()
            self.waiting_since = self.received
            after = await self.handlers[type(step)](step)
            record.outcome = after.outcome
            record.left_at = workflow.now().isoformat()

            steps_without_wait = (
                0 if isinstance(step, WaitStep | WaitForStep) else steps_without_wait + 1
            )
            if after.end:
                self.state.status, self.state.exit_reason = after.end, after.outcome
            elif steps_without_wait > MAX_STEPS_WITHOUT_WAIT:
                self.state.status = "failed"
                self.state.exit_reason = (
                    f"loop without a wait: {MAX_STEPS_WITHOUT_WAIT} steps in a row ending at "
                    f"step {step.id!r}"
                )
            elif after.goto is not None:
                self.state.position = self.document.index_of(after.goto)
            else:
                self.state.position += 1

        if self.state.status == "active":
            self.state.status = "completed"
        workflow.upsert_search_attributes([SA_STATUS.value_set(self.state.status)])
        workflow.set_current_details(f"**{self.state.status}** {self.state.exit_reason or ''}")
        await workflow.execute_activity_method(
            EnrollmentActivities.finish_enrollment,
            FinishEnrollmentInput(
                self.input.enrollment_id, self.state.status, self.state.exit_reason
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Record the enrollment as {self.state.status}",
        )
        return JourneyResult(self.state.status, self.state.exit_reason, self.state.steps_taken)

    @workflow.signal
    def event(self, signal: EventSignal) -> None:
        """An event of this contact (from the API or a provider webhook)."""
        if signal.event_id in self.state.seen_event_ids:
            return
        self.state.seen_event_ids.append(signal.event_id)
        del self.state.seen_event_ids[:-SEEN_EVENT_IDS]
        self.received += 1
        self.inbox.append(signal)

    @workflow.query
    def state_view(self) -> JourneyStateView:
        current = None
        if self.state.status == "active" and self.state.position < len(self.document.steps):
            current = self.document.steps[self.state.position].id
        return JourneyStateView(
            enrollment_id=self.input.enrollment_id,
            journey_key=self.input.journey_key,
            journey_version=self.input.journey_version,
            contact_id=self.input.contact_id,
            status=self.state.status,
            current_step=current,
            exit_reason=self.state.exit_reason,
            history=self.state.history,
        )

    def _show(self, step: Step) -> None:
        """Keep the Temporal UI's search attributes and current details in plain words."""
        workflow.upsert_search_attributes([SA_STEP.value_set(step.id)])
        workflow.set_current_details(
            f"Journey **{self.document.name}** (v{self.input.journey_version}), "
            f"step **{step.label or step.id}** ({step.type})"
        )

    async def _wait(self, step: WaitStep) -> _Next:
        await workflow.sleep(
            step.delay, summary=f"Wait {format_duration(step.delay)} (step {step.id})"
        )
        return _Next(outcome="waited")

    async def _email(self, step: EmailStep) -> _Next:
        visit = self.state.visits[step.id]
        try:
            result = await workflow.execute_activity_method(
                EmailActivities.send_email,
                SendEmailInput(
                    idempotency_key=f"{self.input.enrollment_id}:{step.id}:{visit}",
                    enrollment_id=self.input.enrollment_id,
                    contact_id=self.input.contact_id,
                    journey_key=self.input.journey_key,
                    journey_version=self.input.journey_version,
                    step_id=step.id,
                    template=step.template,
                    subject=step.subject,
                    trigger=self.input.trigger,
                ),
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=timedelta(days=1),
                retry_policy=SEND_RETRY,
                summary=f"Send email '{step.template}' (step {step.id})",
            )
        except ActivityError as err:
            # Retries ran out (a provider down for a day): record it and go on.
            return _Next(outcome=f"email failed: {err.cause or err}")
        return _Next(
            outcome=f"email {result.status}" + (f": {result.reason}" if result.reason else "")
        )

    async def _wait_for(self, step: WaitForStep) -> _Next:
        matched: list[EventSignal] = []

        def arrived() -> bool:
            for signal in self.inbox:
                if signal.name == step.event and (
                    step.where is None
                    or evaluate(step.where, {}, {"properties": signal.properties})
                ):
                    matched.append(signal)
                    return True
            return False

        timeout = step.timeout_delta
        try:
            await workflow.wait_condition(
                arrived,
                timeout=timeout,
                timeout_summary=(
                    f"Wait up to {format_duration(timeout)} for '{step.event}' (step {step.id})"
                    if timeout
                    else None
                ),
            )
        except TimeoutError:
            return _Next(goto=step.on_timeout, outcome="timed out")
        return _Next(goto=step.on_event, outcome=f"event {matched[0].name} ({matched[0].event_id})")

    async def _branch(self, step: BranchStep) -> _Next:
        contact: ContactSnapshot = await workflow.execute_activity_method(
            ContactActivities.load_contact,
            LoadContactInput(self.input.contact_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Read the contact for branch {step.id}",
        )
        if not contact.found:
            return _Next(end="exited", outcome="contact erased")
        facts = contact.__dict__
        for number, case in enumerate(step.cases, start=1):
            if evaluate(case.if_, facts, self.input.trigger):
                return _Next(goto=case.goto, outcome=f"case {number} -> {case.goto}")
        return _Next(goto=step.else_, outcome=f"else -> {step.else_ or 'next step'}")

    async def _goto(self, step: GotoStep) -> _Next:
        return _Next(goto=step.step, outcome=f"goto {step.step}")

    async def _exit(self, step: ExitStep) -> _Next:
        return _Next(end="exited", outcome=f"exit step {step.id}")
