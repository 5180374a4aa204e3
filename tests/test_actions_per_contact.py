"""What each shipped journey costs Temporal per enrolled contact, beside a minimal
hand-written workflow doing the same waits and sends (bench/minimal.py): billable actions
stay within 1.2 times the minimal. Deterministic: the time-skipping server, fixed paths.

The scenarios live in bench/scenarios.py, shared with the benchmark (``python -m bench``).
"""

from __future__ import annotations

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bench.scenarios import ACTIONS_TARGET, SCENARIOS, Scenario, measure_pair


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_shipped_journey_costs_at_most_1_2_times_the_minimal_workflow(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    scenario: Scenario,
) -> None:
    nurture, minimal = await measure_pair(time_env, time_api, scenario)
    ratio = nurture.actions / minimal.actions
    assert ratio <= ACTIONS_TARGET, (
        f"{scenario.name}: {nurture.actions} actions {dict(nurture.by_kind)} against "
        f"{minimal.actions} {dict(minimal.by_kind)} = {ratio:.2f}"
    )
    # The minimal really walked the same path: as many sends and waits.
    assert nurture.by_kind["timer"] == minimal.by_kind["timer"], (nurture, minimal)
