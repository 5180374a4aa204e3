"""Replay: workflow code changes must keep every recorded journey history replayable.

Recorded histories live in tests/histories. To record afresh (only when a change is
meant to be incompatible and is guarded by workflow.patched()), run this module with
NURTURE_RECORD_HISTORIES=1.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from tests.helpers import EXAMPLES, contact, enroll, load_example_templates, publish, wait_for_step
from tests.test_journey_workflow import result_of
from workflows.journey import JourneyWorkflow

HISTORIES = Path(__file__).resolve().parent / "histories"


async def _run_example(
    env: WorkflowEnvironment, api: httpx.AsyncClient, key: str, open_it: bool
) -> WorkflowHistory:
    await load_example_templates(api)
    document: dict[str, Any] = yaml.safe_load(
        (EXAMPLES / "journeys" / "trial-nurture.yaml").read_text()
    )
    document["key"] = key
    if (await api.get(f"/v1/journeys/{key}")).status_code == 404:
        await publish(api, document)
    person = await contact(api, attributes={"first_name": "Ada", "role": "CMO"})
    enrolled = (await enroll(api, key, person["id"]))["enrollment"]
    if open_it:
        await wait_for_step(api, enrolled["id"], "opened")
        response = await api.post(
            "/v1/events",
            json={"id": f"open-{person['id']}", "contact_id": person["id"], "name": "email_opened"},
        )
        assert response.json()["delivered_to"] == 1
    await result_of(env, enrolled["workflow_id"])
    return await env.client.get_workflow_handle(enrolled["workflow_id"]).fetch_history()


@pytest.mark.parametrize("open_it", [True, False], ids=["opened", "never-opened"])
async def test_example_journey_history_replays(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    open_it: bool,
) -> None:
    name = "trial-nurture-" + ("opened" if open_it else "never-opened")
    history = await _run_example(time_env, time_api, "replay-trial-nurture", open_it)
    await Replayer(workflows=[JourneyWorkflow]).replay_workflow(history)
    if os.environ.get("NURTURE_RECORD_HISTORIES"):
        (HISTORIES / f"{name}.json").write_text(
            json.dumps(
                {"workflow_id": history.workflow_id, "history": json.loads(history.to_json())}
            )
        )


RECORDED = sorted(HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
async def test_recorded_history_replays_with_current_code(path: Path) -> None:
    recorded = json.loads(await asyncio.to_thread(path.read_text))
    history = WorkflowHistory.from_json(recorded["workflow_id"], recorded["history"])
    await Replayer(workflows=[JourneyWorkflow]).replay_workflow(history)


def test_histories_are_recorded() -> None:
    assert {p.stem for p in RECORDED} >= {
        "trial-nurture-opened",
        "trial-nurture-never-opened",
        "every-step-type",
        "optimised-steps",
    }


async def test_every_step_type_history_replays(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
) -> None:
    from tests.test_journey_language import Receiver, journey

    receiver = Receiver([200])
    try:
        target = await journey(time_api, [{"id": "hi", "type": "exit"}])
        key = await journey(
            time_api,
            [
                {"id": "pause", "type": "wait", "duration": "1h"},
                {"id": "morning", "type": "wait", "until": {"time": "09:00"}},
                {"id": "mail", "type": "email", "template": "replay-mail",
                 "window": {"from": "08:00", "to": "20:00"}},
                {"id": "text", "type": "sms", "template": "replay-sms"},
                {"id": "opened", "type": "wait_for", "event": "email_opened", "timeout": "1d",
                 "on_timeout": "persona"},
                {"id": "ready", "type": "wait_for", "condition": {"attr": "role", "value": "CMO"}},
                {"id": "persona", "type": "branch",
                 "cases": [{"if": {"attr": "role", "value": "CMO"}, "goto": "ab"}]},
                {"id": "ab", "type": "split",
                 "variants": [{"weight": 1, "goto": "score"},
                              {"weight": 1, "goto": "score", "name": "b"}]},
                {"id": "score", "type": "update_contact", "score": 10, "add_tags": ["replayed"]},
                {"id": "task", "type": "crm", "action": "create_task", "note": "Call"},
                {"id": "hook", "type": "webhook", "url": f"{receiver.url}/replay",
                 "body": {"a": "b"}},
                {"id": "handover", "type": "enroll", "journey": target},
                {"id": "jump", "type": "goto", "step": "bye"},
                {"id": "skipped", "type": "exit"},
                {"id": "bye", "type": "exit"},
            ],
        )  # fmt: skip
        person = await contact(time_api, phone="+14155550199", attributes={"role": "CMO"})
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        history = await time_env.client.get_workflow_handle(enrolled["workflow_id"]).fetch_history()
    finally:
        receiver.close()
    kinds = {e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events}
    assert {"send_email", "send_sms", "update_contact", "record_crm_action", "call_webhook",
            "enroll_contact", "record_variant", "load_contact"} <= kinds  # fmt: skip
    await Replayer(workflows=[JourneyWorkflow]).replay_workflow(history)
    if os.environ.get("NURTURE_RECORD_HISTORIES"):
        (HISTORIES / "every-step-type.json").write_text(
            json.dumps(
                {"workflow_id": history.workflow_id, "history": json.loads(history.to_json())}
            )
        )


async def test_optimised_steps_history_replays(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
) -> None:
    """best_time, channel: best and a winner-test split (recorded as optimised-steps)."""
    from tests.helpers import put_template
    from tests.test_journey_language import journey

    await put_template(
        time_api, "replay-best-sms", channel="sms", text="Hi", subject=None, html=None
    )
    key = await journey(
        time_api,
        [
            {"id": "best", "type": "wait", "best_time": True},
            {"id": "mail", "type": "email", "template": "replay-best-mail",
             "channel": "best", "sms_template": "replay-best-sms"},
            {"id": "ab", "type": "split", "metric": "click", "test_size": 2,
             "variants": [{"weight": 1, "goto": "bye"}, {"weight": 1, "goto": "bye",
                                                         "name": "b"}]},
            {"id": "bye", "type": "exit"},
        ],
        default_timezone="Europe/Paris",
    )  # fmt: skip
    person = await contact(time_api, phone="+14155550198")
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    history = await time_env.client.get_workflow_handle(enrolled["workflow_id"]).fetch_history()
    kinds = {e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events}
    assert {"choose_send_time", "choose_channel", "assign_split_variant"} <= kinds
    await Replayer(workflows=[JourneyWorkflow]).replay_workflow(history)
    if os.environ.get("NURTURE_RECORD_HISTORIES"):
        (HISTORIES / "optimised-steps.json").write_text(
            json.dumps(
                {"workflow_id": history.workflow_id, "history": json.loads(history.to_json())}
            )
        )
