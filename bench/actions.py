"""History events and billable Temporal actions of a workflow run, counted from its history.

The counting rule follows Temporal Cloud's documented action definitions
(https://docs.temporal.io/cloud/actions), as far as a history shows them:

- workflow started (client start, signal-with-start, each continue-as-new run): 1;
- signal received (``WorkflowExecutionSignaled``), and signal sent to another workflow: 1;
- activity started or retried: 1 per attempt (the attempt number its started event carries);
- local activities: 1 per workflow task that ran any;
- timer started, implicit timers of a wait with a timeout included: 1;
- search attribute upsert: 1 per command, except one that only sets
  ``TemporalChangeVersion`` (versioning is exempt); memo upsert (workflow properties): 1;
- child workflow started: 1; update accepted: 1;
- everything else (workflow tasks, completions, patch markers): 0.

Queries are actions too but are not in a history (the bench makes none per contact).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

_ONE = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow started",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signal",
    EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED: "signal",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer",
    EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED: "memo upsert",
    EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED: "child started",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update",
}


@dataclass
class RunCost:
    events: int = 0
    actions: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)

    def add(self, other: RunCost) -> None:
        self.events += other.events
        self.actions += other.actions
        self.by_kind.update(other.by_kind)


def cost_of(history: WorkflowHistory) -> RunCost:
    """History events and billable actions of one run's history."""
    cost = RunCost(events=len(history.events))
    local_in_task = False
    for event in history.events:
        kind = event.event_type
        if kind in _ONE:
            cost.by_kind[_ONE[kind]] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            cost.by_kind["activity"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            # The scheduled event counted the first attempt; retries are actions too.
            cost.by_kind["activity"] += max(
                event.activity_task_started_event_attributes.attempt - 1, 0
            )
        elif kind == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
            if set(fields.indexed_fields) - {"TemporalChangeVersion"}:
                cost.by_kind["search attribute upsert"] += 1
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            if event.marker_recorded_event_attributes.marker_name == "core_local_activity":
                if not local_in_task:
                    cost.by_kind["local activities"] += 1
                local_in_task = True
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            local_in_task = False
    cost.actions = sum(cost.by_kind.values())
    return cost
