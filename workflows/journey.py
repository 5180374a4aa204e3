"""JourneyWorkflow: walks one contact through one published journey version.

The journey document is data; each step type has one small handler. The workflow does
no I/O: contacts are read and changed, messages sent and webhooks called by activities.
Every wait goes through ``_hold``, so a reached goal, a stopped journey or an operator's
move ends it at once, whatever the step (a pending three-week timer included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from datetime import time as clock_time
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.contacts import ContactActivities, ContactUpdateActivities
    from activities.crm import CrmActivities
    from activities.enrollments import EnrollmentActivities
    from activities.messaging import MessagingActivities
    from activities.optimisation import OptimisationActivities, send_time_reason
    from activities.webhooks import WebhookActivities
    from models.conditions import Condition, evaluate, inputs_of
    from models.contracts import (
        SA_STATUS,
        SA_STEP,
        AssignSplitInput,
        AssignSplitResult,
        ChooseChannelInput,
        ChooseChannelResult,
        ContactChangedSignal,
        ContactSnapshot,
        ControlRequest,
        ControlResult,
        CrmInput,
        EnrollInput,
        EventSignal,
        FinishEnrollmentInput,
        JourneyInput,
        JourneyResult,
        JourneyState,
        JourneyStateView,
        JourneyStatusSignal,
        LoadContactInput,
        RecordVariantInput,
        SendMessageInput,
        SendTimeInput,
        SendTimeResult,
        StepChoice,
        StepRecord,
        UpdateContactInput,
        WebhookInput,
    )
    from models.durations import format_duration, parse_duration
    from models.journey import (
        INSTANT_STEPS,
        BranchStep,
        CrmStep,
        EmailStep,
        EnrollStep,
        ExitStep,
        GotoStep,
        SendWindow,
        SmsStep,
        SplitStep,
        SplitVariant,
        Step,
        UntilAt,
        UntilClock,
        UntilDate,
        UpdateContactStep,
        WaitForStep,
        WaitStep,
        WebhookStep,
        parse_journey,
        parse_offset,
    )
    from models.schedule import (
        WEEKDAYS,
        Window,
        moment_at,
        moment_from_value,
        next_time_of_day,
        parse_clock,
        parse_weekdays,
        resolve_zone,
        window_opens_at,
    )

# Steps taken in a row without waiting before the journey is judged to loop forever.
MAX_STEPS_WITHOUT_WAIT = 200
# How often a send held by a paused journey looks again without a status signal.
HELD_SEND_RECHECK = timedelta(hours=1)
# Event ids remembered for de-duplication, events kept for goals (bounded; carried over).
SEEN_EVENT_IDS = 500
RECENT_EVENTS = 100

READ_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
)
# A send heartbeats (activities/messaging.py): a worker that died mid-send is noticed this soon.
SEND_HEARTBEAT = timedelta(seconds=10)
WEBHOOK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=["WebhookRefused"],
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
        self.control: ControlRequest | None = None
        self.status_signals = 0
        self.waiting_for: str | None = None
        self.wakeup: datetime | None = None
        self.handlers: dict[type, Callable[[Any], Awaitable[_Next]]] = {
            WaitStep: self._wait,
            EmailStep: self._email,
            SmsStep: self._sms,
            WaitForStep: self._wait_for,
            BranchStep: self._branch,
            SplitStep: self._split,
            UpdateContactStep: self._update_contact,
            CrmStep: self._crm,
            WebhookStep: self._webhook,
            EnrollStep: self._enroll,
            GotoStep: self._goto,
            ExitStep: self._exit,
        }

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        if self.state.contact is None and self.input.contact is not None:
            self.state.contact = self.input.contact
            self._check_goal(None)
        elif self.state.contact is None and workflow.patched("load-contact-at-start"):
            await self._load_contact("Read the contact")
            self._check_goal(None)
        steps_without_wait = 0
        while self.state.status == "active" and self.state.position < len(self.document.steps):
            if self._interrupted():
                self._apply_interrupt()
                continue
            self._continue_as_new_if_due()
            step = self.document.steps[self.state.position]
            self.state.visits[step.id] = self.state.visits.get(step.id, 0) + 1
            self.state.steps_taken += 1
            record = StepRecord(step.id, step.type, workflow.now().isoformat())
            self.state.history.append(record)
            del self.state.history[:-100]
            self._show(step)

            self.inbox.clear()
            after = await self.handlers[type(step)](step)
            self.waiting_for, self.wakeup = None, None
            record.left_at = workflow.now().isoformat()
            if self._interrupted():
                record.outcome = "interrupted"
                continue
            record.outcome = after.outcome

            steps_without_wait = steps_without_wait + 1 if step.type in INSTANT_STEPS else 0
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
        if self.input.progress_search_attributes:
            workflow.upsert_search_attributes([SA_STATUS.value_set(self.state.status)])
        workflow.set_current_details(f"**{self.state.status}** {self.state.exit_reason or ''}")
        await workflow.execute_activity_method(
            EnrollmentActivities.finish_enrollment,
            FinishEnrollmentInput(
                self.input.enrollment_id,
                self.state.status,
                self.state.exit_reason,
                self.state.goal,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Record the enrollment as {self.state.status}",
        )
        return JourneyResult(
            self.state.status, self.state.exit_reason, self.state.steps_taken, self.state.goal
        )

    @workflow.signal
    def event(self, signal: EventSignal) -> None:
        """An event of this contact (from the API or a provider webhook)."""
        if signal.event_id in self.state.seen_event_ids:
            return
        self.state.seen_event_ids.append(signal.event_id)
        del self.state.seen_event_ids[:-SEEN_EVENT_IDS]
        if not self._same_key(signal):
            return
        self.inbox.append(signal)
        self.state.recent_events.append(signal)
        del self.state.recent_events[:-RECENT_EVENTS]
        self._check_goal(signal)

    @workflow.signal
    def contact_changed(self, signal: ContactChangedSignal) -> None:
        """The contact's profile changed: goals are checked again, branches see the change."""
        self.state.contact = signal.contact
        if not signal.contact.found:
            self.control = ControlRequest("exit", reason="contact erased")
            return
        self._check_goal(None)

    @workflow.signal
    def journey_status(self, signal: JourneyStatusSignal) -> None:
        if signal.status == "stopped":
            self.control = ControlRequest("exit", reason="journey stopped")
        elif signal.status in ("active", "paused"):
            self.state.journey_status = signal.status
        self.status_signals += 1

    @workflow.update
    def move(self, request: ControlRequest) -> ControlResult:
        """An operator moves the contact to a step, or ends its journey."""
        self.control = request
        target = f"step {request.step!r}" if request.action == "goto" else "the end"
        return ControlResult(True, f"moving to {target}")

    @move.validator
    def _validate_move(self, request: ControlRequest) -> None:
        if self.state.status != "active":
            raise ValueError(f"the journey is {self.state.status}; nothing to move")
        if request.action == "goto":
            if not request.step:
                raise ValueError("goto needs a step")
            ids = [s.id for s in self.document.steps]
            if request.step not in ids:
                raise ValueError(f"no step {request.step!r}; steps are: {', '.join(ids)}")
        elif request.action != "exit":
            raise ValueError(f"unknown action {request.action!r}; use goto or exit")

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
            waiting_for=self.waiting_for,
            next_wakeup=self.wakeup.isoformat() if self.wakeup else None,
            goal=self.state.goal,
            variant=self.state.variant,
            journey_status=self.state.journey_status,
            choices=self.state.choices,
        )

    def _same_key(self, signal: EventSignal) -> bool:
        """In a keyed journey an event that names a key value must name this run's."""
        key = self.document.trigger.key if self.document.trigger else None
        if not key or key not in signal.properties:
            return True
        return str(signal.properties[key]) == self.input.run_key

    def _facts(self) -> dict[str, Any]:
        return dict(self.state.contact.__dict__) if self.state.contact else {}

    def _history(self) -> list[dict[str, Any]]:
        return [
            {
                "name": e.name,
                "properties": e.properties,
                "occurred_at": datetime.fromisoformat(e.occurred_at)
                if e.occurred_at
                else workflow.now(),
            }
            for e in self.state.recent_events
        ]

    def _holds(self, condition: Condition, event: EventSignal | None = None) -> bool:
        return evaluate(
            condition,
            self._facts(),
            {"properties": event.properties} if event else self.input.trigger,
            history=self._history(),
            now=workflow.now(),
        )

    def _check_goal(self, event: EventSignal | None) -> None:
        goal = self.document.exit_when
        if goal is None or self.state.goal is not None or self.state.status != "active":
            return
        if self._holds(goal, event):
            cause = f"event {event.name}" if event else "contact profile"
            self.state.goal = f"exit_when met by {cause}"
            self.control = ControlRequest("exit", reason="goal reached")

    def _interrupted(self) -> bool:
        return self.control is not None

    def _apply_interrupt(self) -> None:
        request, self.control = self.control, None
        assert request is not None
        if request.action == "goto" and request.step:
            self.state.position = self.document.index_of(request.step)
            self.state.history.append(
                StepRecord("operator", "move", workflow.now().isoformat(), f"goto {request.step}")
            )
        else:
            self.state.status = "exited"
            self.state.exit_reason = request.reason or "ended by an operator"

    def _continue_as_new_if_due(self) -> None:
        info = workflow.info()
        if not (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() > self.input.history_budget
        ):
            return
        self.state.runs += 1
        # Handlers are synchronous here, so nothing is left half-done by the hand-over.
        workflow.continue_as_new(JourneyInput(**{**self.input.__dict__, "state": self.state}))

    def _show(self, step: Step) -> None:
        """Keep the Temporal UI's search attributes and current details in plain words."""
        if self.input.progress_search_attributes:
            workflow.upsert_search_attributes([SA_STEP.value_set(step.id)])
        self._details(f"step **{step.label or step.id}** ({step.type})")

    def _details(self, where: str) -> None:
        workflow.set_current_details(
            f"Journey **{self.document.name}** (v{self.input.journey_version}), {where}"
            + (f"\n\nWaiting for: {self.waiting_for}" if self.waiting_for else "")
            + (f"\n\nWakes up at: {self.wakeup.isoformat()}" if self.wakeup else "")
        )

    async def _hold(
        self, ready: Callable[[], bool], until: datetime | None, summary: str | None
    ) -> bool:
        """Wait until ``ready()``, an interruption, or ``until``; False when time ran out."""
        timeout = None
        if until is not None:
            timeout = until - workflow.now()
            if timeout <= timedelta(0):
                return ready() or self._interrupted()
        self.wakeup = until
        try:
            await workflow.wait_condition(
                lambda: ready() or self._interrupted(), timeout=timeout, timeout_summary=summary
            )
        except TimeoutError:
            return False
        return True

    async def _hold_while_paused(self) -> None:
        if self.state.journey_status == "paused":
            self.waiting_for = "the journey to be resumed"
            await self._hold(lambda: self.state.journey_status != "paused", None, None)
            self.waiting_for = None

    async def _load_contact(self, summary: str) -> ContactSnapshot:
        contact: ContactSnapshot = await workflow.execute_activity_method(
            ContactActivities.load_contact,
            LoadContactInput(self.input.contact_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=summary,
        )
        self.state.contact = contact
        return contact

    def _zone_and_note(self) -> tuple[Any, str | None]:
        contact_zone = self.state.contact.timezone if self.state.contact else None
        return resolve_zone(contact_zone, self.document.default_timezone)

    async def _wait(self, step: WaitStep) -> _Next:
        if step.duration is not None:
            self.waiting_for = f"{format_duration(step.delay)} to pass"
            await self._hold(
                lambda: False,
                workflow.now() + step.delay,
                f"Wait {format_duration(step.delay)} (step {step.id})",
            )
            return _Next(outcome="waited")
        if step.best_time:
            return await self._best_time(step)
        moment, note = self._until(step)
        if moment is None:
            return _Next(outcome=f"proceeded at once: {note}")
        self.waiting_for = f"until {moment.isoformat()}"
        await self._hold(lambda: False, moment, f"Wait until {moment.isoformat()} (step {step.id})")
        return _Next(outcome=f"waited until {moment.isoformat()}" + (f" ({note})" if note else ""))

    def _choose(self, step_id: str, kind: str, choice: str, reason: str) -> None:
        self.state.choices[step_id] = StepChoice(kind, choice, reason, workflow.now().isoformat())

    async def _best_time(self, step: WaitStep) -> _Next:
        """Wait for the contact's usual engagement hour, else the journey's send time."""
        rule = self.document.send_time_rule
        zone, note = self._zone_and_note()
        now = workflow.now()
        found: SendTimeResult = await workflow.execute_activity_method(
            OptimisationActivities.choose_send_time,
            SendTimeInput(
                contact_id=self.input.contact_id,
                timezone=zone.key,
                now=now.isoformat(),
                lookback_seconds=int(parse_duration(rule.lookback).total_seconds()),
                min_engagements=rule.min_engagements,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Find the usual engagement hour of contact {self.input.contact_id}",
        )
        reason = send_time_reason(found, zone.key, parse_duration(rule.lookback))
        now = workflow.now()  # the activity took a while (or was retried)
        if found.weekday is not None and found.hour is not None:
            # Inside that hour already: now; else when it next begins (DST rules as elsewhere).
            start = clock_time(found.hour)
            hour = Window(start, clock_time(found.hour, 59, 59), frozenset({found.weekday}))
            moment = window_opens_at(now, hour, zone)
            choice = f"{WEEKDAYS[found.weekday]} {start.isoformat('minutes')} {zone.key}"
        else:
            clock, weekdays = parse_clock(rule.time), parse_weekdays(rule.weekdays)
            moment = next_time_of_day(now, zone, clock, weekdays)
            days = ",".join(rule.weekdays) if rule.weekdays else "every day"
            choice = f"journey default {rule.time} {days} {zone.key}"
            reason = f"{reason}, fewer than {rule.min_engagements}: {choice}"
        if note:
            reason = f"{reason}; {note}"
        self._choose(step.id, "send_time", choice, reason)
        if moment <= workflow.now():
            return _Next(outcome=f"best time is now: {choice} ({reason})")
        self.waiting_for = f"the best time {moment.isoformat()} ({reason})"
        self._details(f"step **{step.label or step.id}** (wait, best_time)")
        await self._hold(lambda: False, moment, f"Wait for the best time {choice} (step {step.id})")
        return _Next(outcome=f"waited until {moment.isoformat()}: {choice} ({reason})")

    def _until(self, step: WaitStep) -> tuple[datetime | None, str | None]:
        """The moment a ``wait until`` ends (None: proceed now) and a note about it."""
        zone, note = self._zone_and_note()
        now = workflow.now()
        until = step.until
        if isinstance(until, UntilClock):
            moment = next_time_of_day(
                now, zone, parse_clock(until.time), parse_weekdays(until.weekdays)
            )
        elif isinstance(until, UntilAt):
            moment = moment_at(until.at, zone)
        else:
            assert isinstance(until, UntilDate)
            if until.attr is not None:
                source = f"attribute {until.attr!r}"
                value = self._facts().get(
                    until.attr, (self._facts().get("attributes") or {}).get(until.attr)
                )
            else:
                source = f"trigger property {until.prop!r}"
                value = ((self.input.trigger or {}).get("properties") or {}).get(until.prop)
            found, reason = moment_from_value(
                value,
                zone,
                now=now,
                offset=parse_offset(until.offset) if until.offset else timedelta(0),
                clock=parse_clock(until.time) if until.time else None,
                yearly=until.yearly,
            )
            if found is None:
                return None, f"{source}: {reason}"
            moment = found
        if moment <= now:
            return None, f"{moment.isoformat()} is already past" + (f"; {note}" if note else "")
        return moment, note

    async def _window_allows(self, step_id: str, window: SendWindow | None) -> str | None:
        """Wait for the send window (defer) or say why the send is skipped (skip)."""
        if window is None:
            return None
        zone, _ = self._zone_and_note()
        opens = window_opens_at(workflow.now(), window.window, zone)
        if opens <= workflow.now():
            return None
        if window.outside == "skip":
            return f"outside the send window (opens {opens.isoformat()})"
        self.waiting_for = f"the send window to open at {opens.isoformat()}"
        await self._hold(lambda: False, opens, f"Wait for the send window (step {step_id})")
        return None

    async def _best_channel(self, step: EmailStep | SmsStep) -> str:
        templates = step.channel_templates()
        lookback = parse_duration(self.document.send_time_rule.lookback)
        chosen: ChooseChannelResult = await workflow.execute_activity_method(
            OptimisationActivities.choose_channel,
            ChooseChannelInput(
                contact_id=self.input.contact_id,
                declared=step.type,
                channels=sorted(templates),
                now=workflow.now().isoformat(),
                lookback_seconds=int(lookback.total_seconds()),
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Choose email or SMS for contact {self.input.contact_id} (step {step.id})",
        )
        self._choose(step.id, "channel", chosen.channel, chosen.reason)
        return chosen.channel

    async def _send(self, step: EmailStep | SmsStep) -> _Next:
        channel: str = step.type
        template = step.template
        if step.channel == "best":
            channel = await self._best_channel(step)
            template = step.channel_templates()[channel]
        skip = await self._window_allows(step.id, step.window)
        if skip:
            return _Next(outcome=f"{channel} skipped: {skip}")
        visit = self.state.visits[step.id]
        activity = (
            MessagingActivities.send_email if channel == "email" else MessagingActivities.send_sms
        )
        while not self._interrupted():
            await self._hold_while_paused()
            if self._interrupted():
                break
            try:
                result = await workflow.execute_activity_method(
                    activity,
                    SendMessageInput(
                        idempotency_key=f"{self.input.enrollment_id}:{step.id}:{visit}",
                        enrollment_id=self.input.enrollment_id,
                        contact_id=self.input.contact_id,
                        journey_key=self.input.journey_key,
                        journey_version=self.input.journey_version,
                        step_id=step.id,
                        template=template,
                        subject=step.subject
                        if isinstance(step, EmailStep) and channel == "email"
                        else None,
                        variant=self.state.variant,
                        trigger=self.input.trigger,
                        now=workflow.now().isoformat(),
                        default_timezone=self.document.default_timezone,
                    ),
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_close_timeout=timedelta(days=1),
                    heartbeat_timeout=SEND_HEARTBEAT,
                    retry_policy=SEND_RETRY,
                    summary=f"{'Email' if channel == 'email' else 'SMS'} '{template}' "
                    f"to contact {self.input.contact_id} (step {step.id})",
                )
            except ActivityError as err:
                # Retries ran out (a provider down for a day): record it and go on.
                return _Next(outcome=f"{channel} failed: {err.cause or err}")
            if result.status == "deferred" and result.retry_at:
                until = datetime.fromisoformat(result.retry_at)
                self.waiting_for = f"{result.reason}; sending at {until.isoformat()}"
                await self._hold(
                    lambda: False, until, f"Defer the {channel} (step {step.id}): {result.reason}"
                )
                self.waiting_for = None
                continue
            if result.status == "held":
                # The journey was paused but our signal has not come (or crossed a resume):
                # wait for the next status signal, and look again now and then regardless.
                seen = self.status_signals
                self.waiting_for = "the journey to be resumed"
                await self._hold(
                    lambda seen=seen: self.status_signals > seen,  # type: ignore[misc]
                    workflow.now() + HELD_SEND_RECHECK,
                    f"Check whether journey '{self.input.journey_key}' was resumed",
                )
                self.waiting_for = None
                continue
            return _Next(
                outcome=f"{channel} {result.status}"
                + (f": {result.reason}" if result.reason else "")
            )
        return _Next(outcome="interrupted")

    async def _email(self, step: EmailStep) -> _Next:
        return await self._send(step)

    async def _sms(self, step: SmsStep) -> _Next:
        return await self._send(step)

    async def _wait_for(self, step: WaitForStep) -> _Next:
        matched: list[str] = []
        condition = step.condition

        def arrived() -> bool:
            if condition is not None:
                if self._holds(condition):
                    matched.append("condition true")
                    return True
                return False
            for signal in self.inbox:
                if signal.name == step.event and (
                    step.where is None or self._holds(step.where, signal)
                ):
                    matched.append(f"event {signal.name} ({signal.event_id})")
                    return True
            return False

        if condition is not None and arrived():
            return _Next(goto=step.on_event, outcome="condition already true")
        timeout = step.timeout_delta
        self.waiting_for = f"event '{step.event}'" if step.event else "the condition to hold"
        deadline = workflow.now() + timeout if timeout else None
        got = await self._hold(
            arrived,
            deadline,
            f"Wait up to {format_duration(timeout)} for '{step.event or 'the condition'}' "
            f"(step {step.id})"
            if timeout
            else None,
        )
        if not got:
            return _Next(goto=step.on_timeout, outcome="timed out")
        if not matched:
            return _Next(outcome="interrupted")
        return _Next(goto=step.on_event, outcome=matched[0])

    async def _branch(self, step: BranchStep) -> _Next:
        reads = [inputs_of(case.if_) for case in step.cases]
        if any(i.profile or i.segments for i in reads) or not workflow.patched(
            "branch-reads-contact-only-for-profile"
        ):
            contact = await self._load_contact(f"Read the contact for branch {step.id}")
            if not contact.found:
                return _Next(end="exited", outcome="contact erased")
        for number, case in enumerate(step.cases, start=1):
            if self._holds(case.if_):
                return _Next(goto=case.goto, outcome=f"case {number} -> {case.goto}")
        return _Next(goto=step.else_, outcome=f"else -> {step.else_ or 'next step'}")

    def _weighted_variant(self, step: SplitStep) -> SplitVariant:
        # Deterministic per enrollment and step: the same contact always gets the same arm.
        digest = hashlib.sha256(f"{self.input.enrollment_id}:{step.id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % sum(v.weight for v in step.variants)
        for variant in step.variants:
            if point < variant.weight:
                break
            point -= variant.weight
        return variant

    async def _split_test(self, step: SplitStep, proposed: SplitVariant) -> _Next:
        """A split with a winner test: the shared test decides (see activities/optimisation)."""
        assert step.metric is not None and step.test_size is not None
        events = {
            "open": ["email_opened", "email_clicked"],
            "click": ["email_clicked"],
            "conversion": self.document.goals(),
        }[step.metric]
        assigned: AssignSplitResult = await workflow.execute_activity_method(
            OptimisationActivities.assign_split_variant,
            AssignSplitInput(
                journey_key=self.input.journey_key,
                step_id=step.id,
                enrollment_id=self.input.enrollment_id,
                contact_id=self.input.contact_id,
                proposed=proposed.variant,
                variants=[v.variant for v in step.variants],
                metric=step.metric,
                success_events=events,
                test_size=step.test_size,
                confidence=step.confidence_level,
                observe_seconds=int(step.observe_delta.total_seconds()),
                now=workflow.now().isoformat(),
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Assign a variant of the {step.metric} test (step {step.id})",
        )
        variant = next(v for v in step.variants if v.variant == assigned.variant)
        self.state.variant = variant.variant
        self._choose(step.id, "split", variant.variant, assigned.reason)
        return _Next(goto=variant.goto, outcome=f"variant {variant.variant}: {assigned.reason}")

    async def _split(self, step: SplitStep) -> _Next:
        variant = self._weighted_variant(step)
        if step.metric is not None:
            return await self._split_test(step, variant)
        self.state.variant = variant.variant
        await workflow.execute_activity_method(
            EnrollmentActivities.record_variant,
            RecordVariantInput(self.input.enrollment_id, variant.variant),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Record variant '{variant.variant}' (step {step.id})",
        )
        return _Next(goto=variant.goto, outcome=f"variant {variant.variant}")

    async def _update_contact(self, step: UpdateContactStep) -> _Next:
        contact: ContactSnapshot = await workflow.execute_activity_method(
            ContactUpdateActivities.update_contact,
            UpdateContactInput(
                idempotency_key=f"{self.input.enrollment_id}:{step.id}:{self.state.visits[step.id]}",
                contact_id=self.input.contact_id,
                set=step.set,
                add_tags=step.add_tags,
                remove_tags=step.remove_tags,
                score=step.score,
                lifecycle_stage=step.lifecycle_stage,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"Update contact {self.input.contact_id} (step {step.id})",
        )
        if not contact.found:
            return _Next(end="exited", outcome="contact erased")
        self.state.contact = contact
        self._check_goal(None)
        return _Next(outcome="contact updated")

    async def _crm(self, step: CrmStep) -> _Next:
        await workflow.execute_activity_method(
            CrmActivities.record_crm_action,
            CrmInput(
                idempotency_key=f"{self.input.enrollment_id}:{step.id}:{self.state.visits[step.id]}",
                contact_id=self.input.contact_id,
                enrollment_id=self.input.enrollment_id,
                journey_key=self.input.journey_key,
                step_id=step.id,
                action=step.action,
                note=step.note,
                owner=step.owner,
                due_in_seconds=int(parse_duration(step.due_in).total_seconds())
                if step.due_in
                else None,
                properties=step.properties,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
            summary=f"CRM {step.action.replace('_', ' ')} for contact {self.input.contact_id}",
        )
        return _Next(outcome=f"crm {step.action}")

    async def _webhook(self, step: WebhookStep) -> _Next:
        await self._hold_while_paused()
        if self._interrupted():
            return _Next(outcome="interrupted")
        try:
            result = await workflow.execute_activity_method(
                WebhookActivities.call_webhook,
                WebhookInput(
                    idempotency_key=f"{self.input.enrollment_id}:{step.id}:{self.state.visits[step.id]}",
                    contact_id=self.input.contact_id,
                    journey_key=self.input.journey_key,
                    step_id=step.id,
                    url=step.url,
                    method=step.method,
                    body=step.body,
                    headers=step.headers,
                    trigger=self.input.trigger,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(hours=6),
                retry_policy=WEBHOOK_RETRY,
                summary=f"Call webhook {step.method} {step.url[:120]} (step {step.id})",
            )
        except ActivityError as err:
            return _Next(outcome=f"webhook failed: {err.cause or err}")
        return _Next(outcome=f"webhook answered {result.status_code}")

    async def _enroll(self, step: EnrollStep) -> _Next:
        result = await workflow.execute_activity_method(
            EnrollmentActivities.enroll_contact,
            EnrollInput(
                contact_id=self.input.contact_id,
                journey_key=step.journey,
                trigger=self.input.trigger,
                source=f"{self.input.journey_key}/{step.id}",
            ),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=READ_RETRY,
            summary=f"Enroll contact {self.input.contact_id} in journey '{step.journey}'",
        )
        if result.enrolled:
            return _Next(outcome=f"enrolled in {step.journey}")
        return _Next(outcome=f"not enrolled in {step.journey}: {result.reason}")

    async def _goto(self, step: GotoStep) -> _Next:
        return _Next(goto=step.step, outcome=f"goto {step.step}")

    async def _exit(self, step: ExitStep) -> _Next:
        return _Next(end="exited", outcome=f"exit step {step.id}")
