"""Frequency caps and quiet hours defer sends (never drop them), judged on the journey's clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from temporalio.testing import WorkflowEnvironment

from settings import Settings
from tests.helpers import contact, enroll, unique
from tests.test_journey_language import journey, left_at, state
from tests.test_journey_workflow import messages_of, result_of
from worker import build_worker


async def test_daily_cap_defers_the_second_email_by_a_day(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    capped = settings.model_copy(update={"email_daily_cap": 1})
    key = await journey(
        time_api,
        [
            {"id": "first", "type": "email", "template": unique("a")},
            {"id": "second", "type": "email", "template": unique("b")},
        ],
    )
    person = await contact(time_api)
    async with build_worker(time_env.client, capped):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])
    sent = await messages_of(settings, enrolled["id"])
    assert sorted((m.step_id, m.status) for m in sent) == [("first", "sent"), ("second", "sent")]
    # The cap counts from the first message's stored send time (the database's clock); the
    # steps are stamped by the workflow's clock. Under time skipping the two can differ by
    # the milliseconds the first send took (seen: 64 ms short of a day on a loaded machine).
    gap = left_at(view, "second") - left_at(view, "first")
    assert gap >= timedelta(days=1) - timedelta(seconds=1), gap


async def test_sms_quiet_hours_defer_to_the_end_of_the_quiet_time(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    now = (await time_env.get_current_time()).astimezone(UTC)
    start = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=3)
    quiet = settings.model_copy(update={"sms_quiet_hours": f"{start:%H:%M}-{end:%H:%M}"})
    key = await journey(time_api, [{"id": "text", "type": "sms", "template": unique("s")}])
    person = await contact(time_api, phone="+14155550177")
    async with build_worker(time_env.client, quiet):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent"
    sent_at = left_at(view, "text").astimezone(UTC)
    assert (sent_at.hour, sent_at.minute) == (end.hour, end.minute)
    assert sent_at > datetime.fromisoformat(view["history"][0]["entered_at"])
