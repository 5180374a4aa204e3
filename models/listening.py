"""Which signals a journey version can act on, so delivery sends no others.

Every signal is a billable Temporal action and a workflow task, so an event reaches only the
running journeys whose document reads it: a ``wait_for`` event, a condition that counts or
looks back on it (goals, branches, ``wait_for`` conditions and ``where`` filters, all kept
in the run's recent events), or a goal that reads the properties of any event. Contact
changes reach only journeys that read the profile between their own contact reads (goals,
``wait_for`` conditions and filters, ``wait until`` an attribute, and the contact's time
zone for clock waits and send windows). Versions are immutable, so the answer is computed
once per version.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.conditions import Condition, Inputs, inputs_of
from models.journey import (
    BranchStep,
    EmailStep,
    JourneyDocument,
    SmsStep,
    WaitForStep,
    WaitStep,
)


@dataclass(frozen=True)
class Listening:
    events: frozenset[str] = frozenset()
    every_event: bool = False  # a goal reads ``prop`` of whatever event arrives
    contact_changes: bool = False
    segments: bool = False  # some condition reads the contact's segments

    def hears(self, event_name: str) -> bool:
        return self.every_event or event_name in self.events


def listening_of(document: JourneyDocument) -> Listening:
    """The events and changes a run of this journey version can act on."""
    events: set[str] = set()
    profile = False
    every_event = False
    segments = False

    def read(condition: Condition | None, *, in_event: bool = False) -> Inputs:
        nonlocal profile, segments
        if condition is None:
            return Inputs()
        inputs = inputs_of(condition, in_event=in_event)
        events.update(inputs.events)
        profile = profile or inputs.profile or bool(inputs.segments)
        segments = segments or bool(inputs.segments)
        return inputs

    # A goal is checked against each arriving event: a bare ``prop`` reads any event.
    every_event = read(document.exit_when).event_property
    for step in document.steps:
        if isinstance(step, WaitForStep):
            if step.event:
                events.add(step.event)
            read(step.where, in_event=True)
            read(step.condition)
        elif isinstance(step, BranchStep):
            # Branches read the contact afresh, but count events held by the run.
            for case in step.cases:
                events.update(inputs_of(case.if_).events)
                segments = segments or bool(inputs_of(case.if_).segments)
        elif isinstance(step, WaitStep) and step.until is not None:
            profile = True  # judged in the contact's time zone (or on its attribute)
        elif isinstance(step, EmailStep | SmsStep) and step.window is not None:
            profile = True  # the window is judged in the contact's time zone
    return Listening(frozenset(events), every_event, profile, segments)
