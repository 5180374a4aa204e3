"""A/B winner splits: synthetic engagement with known answers, p-values checked against
hand-computed ones (the two-proportion z-test, written out here independently)."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.optimisation import (
    OptimisationActivities,
    chi_square_sf,
    decide_split,
    homogeneity_p_value,
)
from models.contracts import AssignSplitInput
from models.db import session_scope
from models.tables import (
    Contact,
    Enrollment,
    Event,
    Journey,
    JourneyStatus,
    JourneyVersion,
    SplitAssignment,
    SplitTest,
)
from settings import Settings
from tests.helpers import contact, enroll, publish, unique
from tests.test_journey_language import state
from tests.test_journey_workflow import result_of

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def z_test_p_value(n_a: int, x_a: int, n_b: int, x_b: int) -> float:
    """Two-sided pooled two-proportion z-test, by hand."""
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (x_b / n_b - x_a / n_a) / se
    return math.erfc(abs(z) / math.sqrt(2))


def test_chi_square_tail_matches_the_tables() -> None:
    # 95th percentiles of chi-square with 1..5 and 10 degrees of freedom (standard tables).
    for statistic, df in [(3.841459, 1), (5.991465, 2), (7.814728, 3), (9.487729, 4),
                          (11.070498, 5), (18.307038, 10)]:  # fmt: skip
        assert chi_square_sf(statistic, df) == pytest.approx(0.05, abs=1e-6)
    assert chi_square_sf(6.634897, 1) == pytest.approx(0.01, abs=1e-6)
    assert chi_square_sf(0, 3) == 1.0


def test_two_variant_p_value_is_the_two_proportion_z_test() -> None:
    assert homogeneity_p_value([200, 200], [20, 40]) == pytest.approx(
        z_test_p_value(200, 20, 200, 40), rel=1e-9
    )
    assert homogeneity_p_value([200, 200], [20, 40]) == pytest.approx(0.0051014, abs=1e-6)
    assert homogeneity_p_value([10, 10], [0, 0]) == 1.0  # nothing to tell apart


def test_decision_waits_for_every_variant_then_names_the_best_rate() -> None:
    stats = {"a": (30, 3), "b": (29, 12)}
    assert decide_split(["a", "b"], stats, 30, 0.95)[0] == "testing"
    status, winner, p_value = decide_split(["a", "b"], {**stats, "b": (30, 12)}, 30, 0.95)
    assert (status, winner) == ("winner", "b")
    assert p_value == pytest.approx(z_test_p_value(30, 3, 30, 12))
    status, winner, p_value = decide_split(["a", "b"], {"a": (30, 6), "b": (30, 7)}, 30, 0.95)
    assert (status, winner) == ("no_difference", None)
    assert p_value == pytest.approx(z_test_p_value(30, 6, 30, 7))
    # The same data is a winner at 90% confidence only when p < 0.10.
    assert decide_split(["a", "b"], {"a": (40, 8), "b": (40, 15)}, 40, 0.90)[0] == "winner"
    assert decide_split(["a", "b"], {"a": (40, 8), "b": (40, 15)}, 40, 0.95)[0] == ("no_difference")


class Audience:
    """Synthetic contacts and enrollments in one journey, straight into PostgreSQL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.activities = OptimisationActivities(settings)
        self.key = unique("ab")
        self.journey_id = uuid.uuid4()
        self.version_id = uuid.uuid4()
        self.contacts: dict[str, str] = {}  # enrollment -> contact
        self.by_variant: dict[str, list[str]] = {}  # enrollments of the test phase

    async def create(self) -> None:
        async with session_scope(self.settings.database_url) as session:
            session.add(
                Journey(id=self.journey_id, key=self.key, name="AB", status=JourneyStatus.active)
            )
            await session.flush()
            session.add(JourneyVersion(id=self.version_id, journey_id=self.journey_id, version=1))

    async def arrive(
        self, proposed: str, at: datetime, variants: tuple[str, ...] = ("a", "b"), size: int = 30
    ) -> tuple[str, str, str]:
        """A new contact reaches the split; (enrollment id, variant, reason)."""
        contact_id, enrollment_id = uuid.uuid4(), uuid.uuid4()
        async with session_scope(self.settings.database_url) as session:
            session.add(Contact(id=contact_id, email=f"{contact_id}@example.com"))
            await session.flush()
            session.add(
                Enrollment(
                    id=enrollment_id,
                    journey_id=self.journey_id,
                    journey_version_id=self.version_id,
                    contact_id=contact_id,
                    workflow_id=f"journey/{self.key}/contact/{contact_id}",
                )
            )
        self.contacts[str(enrollment_id)] = str(contact_id)
        result = await self.assign(str(enrollment_id), proposed, at, variants, size)
        return str(enrollment_id), result[0], result[1]

    async def assign(
        self,
        enrollment_id: str,
        proposed: str,
        at: datetime,
        variants: tuple[str, ...] = ("a", "b"),
        size: int = 30,
    ) -> tuple[str, str]:
        result = await self.activities.assign_split_variant(
            AssignSplitInput(
                journey_key=self.key,
                step_id="subject-test",
                enrollment_id=enrollment_id,
                contact_id=self.contacts[enrollment_id],
                proposed=proposed,
                variants=list(variants),
                metric="click",
                success_events=["email_clicked"],
                test_size=size,
                confidence=0.95,
                observe_seconds=86400,
                now=at.isoformat(),
            )
        )
        return result.variant, result.reason

    async def click(self, enrollment_id: str, at: datetime) -> None:
        async with session_scope(self.settings.database_url) as session:
            session.add(
                Event(
                    idempotency_id=str(uuid.uuid4()),
                    contact_id=uuid.UUID(self.contacts[enrollment_id]),
                    name="email_clicked",
                    occurred_at=at,
                )
            )

    async def test_row(self) -> SplitTest:
        async with session_scope(self.settings.database_url) as session:
            return (
                await session.exec(select(SplitTest).where(SplitTest.journey_key == self.key))
            ).one()

    async def phase(self, clicks: dict[str, int], variants: tuple[str, ...] = ("a", "b")) -> None:
        """30 contacts per variant at T0; the first ``clicks[v]`` of each click 2 hours later."""
        for n in range(30):
            for variant in variants:
                enrollment, got, _ = await self.arrive(variant, T0, variants)
                assert got == variant  # testing: the weighted proposal stands
                self.by_variant.setdefault(variant, []).append(enrollment)
                if n < clicks.get(variant, 0):
                    await self.click(enrollment, T0 + timedelta(hours=2))


async def test_variant_that_clicks_clearly_more_wins_and_takes_everyone_after(
    settings: Settings,
) -> None:
    audience = Audience(settings)
    await audience.create()
    await audience.phase({"a": 3, "b": 12})
    # Noise that must not count: a click before the split, one after the observation day.
    quiet_a = audience.by_variant["a"][-1]
    await audience.click(quiet_a, T0 - timedelta(hours=1))
    await audience.click(quiet_a, T0 + timedelta(hours=30))
    # Half a day on, nobody is observed yet: still testing.
    late, variant, reason = await audience.arrive("a", T0 + timedelta(hours=12))
    assert (variant, reason) == ("a", "by weight while the click test runs")

    _, variant, reason = await audience.arrive("a", T0 + timedelta(days=1, minutes=1))

    expected_p = z_test_p_value(30, 3, 30, 12)
    assert expected_p == pytest.approx(0.0073, abs=1e-4)
    assert variant == "b"
    assert reason == f"winner of the click test (p = {expected_p:.4g})"
    test = await audience.test_row()
    assert (test.status, test.winner) == ("winner", "b")
    assert test.p_value == pytest.approx(expected_p, rel=1e-9)
    assert test.decided_at == T0 + timedelta(days=1, minutes=1)
    assert test.stats == {
        "a": {"observed": 30, "successes": 3, "rate": 0.1},
        "b": {"observed": 30, "successes": 12, "rate": 0.4},
    }
    later = [await audience.arrive(p, T0 + timedelta(days=2)) for p in ("a", "b", "a", "a")]
    assert [v for _, v, _ in later] == ["b", "b", "b", "b"]
    # The contact assigned during the test keeps its variant when its activity is retried.
    assert await audience.assign(late, "b", T0 + timedelta(days=3)) == (
        "a",
        "assigned earlier in this test",
    )


async def test_no_significant_difference_keeps_the_weights(settings: Settings) -> None:
    audience = Audience(settings)
    await audience.create()
    await audience.phase({"a": 6, "b": 7})

    arrivals = [await audience.arrive(p, T0 + timedelta(days=2)) for p in ("a", "b", "b", "a")]

    expected_p = z_test_p_value(30, 6, 30, 7)
    assert expected_p == pytest.approx(0.7540, abs=1e-4)
    assert [v for _, v, _ in arrivals] == ["a", "b", "b", "a"]
    assert arrivals[0][2] == (
        f"by weight: the click test found no difference (p = {expected_p:.4g})"
    )
    test = await audience.test_row()
    assert (test.status, test.winner) == ("no_difference", None)
    assert test.p_value == pytest.approx(expected_p, rel=1e-9)
    assert test.decided_at == T0 + timedelta(days=2)  # decided once, by the first arrival


async def test_three_variants_use_the_chi_square_test(settings: Settings) -> None:
    audience = Audience(settings)
    await audience.create()
    await audience.phase({"a": 3, "b": 12, "c": 4}, variants=("a", "b", "c"))

    _, variant, _ = await audience.arrive("c", T0 + timedelta(days=2), ("a", "b", "c"))

    # By hand: expected clicks 19/90 of 30 for each variant; df = 2, so p = exp(-x / 2).
    rate = 19 / 90
    statistic = sum(
        (won - 30 * rate) ** 2 / (30 * rate) + (30 - won - 30 * (1 - rate)) ** 2 / (30 * (1 - rate))
        for won in (3, 12, 4)
    )
    test = await audience.test_row()
    assert variant == "b" and test.winner == "b"
    assert test.p_value == pytest.approx(math.exp(-statistic / 2), rel=1e-9)


async def test_simultaneous_arrivals_make_one_decision(settings: Settings) -> None:
    audience = Audience(settings)
    await audience.create()
    await audience.phase({"a": 2, "b": 14})
    due = T0 + timedelta(days=2)

    arrivals = await asyncio.gather(
        *(audience.arrive("a" if n % 2 else "b", due + timedelta(seconds=n)) for n in range(8))
    )

    assert {v for _, v, _ in arrivals} == {"b"}
    async with session_scope(settings.database_url) as session:
        tests = (
            await session.exec(select(SplitTest).where(SplitTest.journey_key == audience.key))
        ).all()
        assigned = (
            await session.exec(
                select(SplitAssignment).where(SplitAssignment.split_test_id == tests[0].id)
            )
        ).all()
    assert len(tests) == 1 and len(assigned) == 68


async def split_journey(api: httpx.AsyncClient, metric: str) -> str:
    key = unique("ab-journey")
    document: dict[str, Any] = {"key": key, "name": "AB", "steps": [
        {"id": "ab", "type": "split", "metric": metric, "test_size": 4,
         "variants": [{"weight": 1, "goto": "end-a", "name": "a"},
                      {"weight": 1, "goto": "end-b", "name": "b"}]},
        {"id": "end-a", "type": "exit"},
        {"id": "end-b", "type": "exit"},
    ]}  # fmt: skip
    if metric == "conversion":
        document["exit_when"] = {"event": "purchase_completed"}
    await publish(api, document)
    return key


async def through_split(
    env: WorkflowEnvironment, api: httpx.AsyncClient, settings: Settings, key: str
) -> tuple[dict[str, Any], str]:
    person = await contact(api)
    enrolled = (await enroll(api, key, person["id"]))["enrollment"]
    await result_of(env, enrolled["workflow_id"])
    async with session_scope(settings.database_url) as session:
        row = await session.get(Enrollment, uuid.UUID(enrolled["id"]))
        assert row is not None and row.variant is not None
        return enrolled, row.variant


@pytest.mark.parametrize(
    ("metric", "event"), [("click", "email_clicked"), ("conversion", "purchase_completed")]
)
async def test_journey_split_picks_the_winner_for_later_contacts(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    metric: str,
    event: str,
) -> None:
    key = await split_journey(time_api, metric)
    counts = {"a": 0, "b": 0}
    for _ in range(40):
        if min(counts.values()) >= 4:
            break
        enrolled, variant = await through_split(time_env, time_api, settings, key)
        counts[variant] += 1
        if variant == "b":  # every B contact converts within the hour, no A contact does
            async with session_scope(settings.database_url) as session:
                assigned_at = (
                    await session.exec(
                        select(SplitAssignment.assigned_at).where(
                            col(SplitAssignment.enrollment_id) == uuid.UUID(enrolled["id"])
                        )
                    )
                ).one()
            response = await time_api.post("/v1/events", json={
                "id": f"won-{enrolled['id']}", "contact_id": str(enrolled["contact_id"]),
                "name": event, "occurred_at": (assigned_at + timedelta(hours=1)).isoformat(),
            })  # fmt: skip
            assert response.status_code == 202, response.text
    assert min(counts.values()) >= 4
    testing = (await time_api.get(f"/v1/journeys/{key}/splits/ab")).json()
    assert testing["status"] == "testing" and testing["winner"] is None

    await time_env.sleep(timedelta(days=2))
    later = [await through_split(time_env, time_api, settings, key) for _ in range(4)]

    assert [variant for _, variant in later] == ["b"] * 4
    expected_p = z_test_p_value(counts["a"], 0, counts["b"], counts["b"])
    view = await state(time_api, later[0][0]["id"])
    assert view["variant"] == "b"
    assert view["choices"]["ab"]["reason"] == (
        f"winner of the {metric} test (p = {expected_p:.4g})"
    )
    results = await time_api.get(f"/v1/journeys/{key}/splits/ab")
    assert results.status_code == 200, results.text
    body = results.json()
    assert (body["status"], body["winner"], body["metric"]) == ("winner", "b", metric)
    assert body["p_value"] == pytest.approx(expected_p, rel=1e-9)
    assert body["success_events"] == (
        ["email_clicked"] if metric == "click" else ["purchase_completed"]
    )
    assert body["decision"] == {
        "a": {"observed": counts["a"], "successes": 0, "rate": 0.0},
        "b": {"observed": counts["b"], "successes": counts["b"], "rate": 1.0},
    }
    assigned = {v["variant"]: v["assigned"] for v in body["variants"]}
    assert assigned == {"a": counts["a"], "b": counts["b"] + 4}


async def test_split_results_endpoint_refuses_what_is_not_a_winner_test(
    time_api: httpx.AsyncClient,
) -> None:
    key = unique("plain-split")
    await publish(time_api, {"key": key, "name": "Plain", "steps": [
        {"id": "ab", "type": "split", "variants": [{"weight": 1, "goto": "x"},
                                                   {"weight": 1, "goto": "y"}]},
        {"id": "x", "type": "exit"}, {"id": "y", "type": "exit"},
    ]})  # fmt: skip
    for path, words in [
        (f"/v1/journeys/{key}/splits/ab", "no split step 'ab' with a metric"),
        (f"/v1/journeys/{key}/splits/x", "no split step 'x' with a metric"),
        ("/v1/journeys/no-such-journey/splits/ab", "no-such-journey"),
    ]:
        response = await time_api.get(path)
        assert response.status_code == 404, response.text
        assert words in response.json()["detail"]
    assert (await time_api.get(f"/v1/journeys/{key}/splits/bad%20id")).status_code == 422


@pytest.mark.parametrize(
    ("split", "top", "message"),
    [
        ({"metric": "click"}, {}, "a winner test needs both metric and test_size"),
        ({"test_size": 10}, {}, "a winner test needs both metric and test_size"),
        ({"confidence": 0.9}, {}, "confidence and observe belong to a winner test"),
        ({"metric": "click", "test_size": 1}, {}, "greater than or equal to 2"),
        ({"metric": "revenue", "test_size": 10}, {}, "'open', 'click' or 'conversion'"),
        ({"metric": "click", "test_size": 10, "observe": "soon"}, {}, "invalid duration"),
        (
            {"metric": "conversion", "test_size": 10},
            {"exit_when": {"segment": "customers"}},
            "metric conversion counts the journey's goal events",
        ),
    ],
)
async def test_winner_test_fields_are_validated_naming_the_step(
    time_api: httpx.AsyncClient, split: dict[str, Any], top: dict[str, Any], message: str
) -> None:
    key = unique("bad-split")
    response = await time_api.post("/v1/journeys", json={"key": key, "name": "Bad", **top,
        "steps": [{"id": "ab", "type": "split", **split,
                   "variants": [{"weight": 1, "goto": "x"}, {"weight": 1, "goto": "y"}]},
                  {"id": "x", "type": "exit"}, {"id": "y", "type": "exit"}]})  # fmt: skip
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]["errors"]
    assert message in problem["message"] and "ab" in problem["message"]
    assert (await time_api.get(f"/v1/journeys/{key}")).status_code == 404
