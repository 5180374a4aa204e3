"""Prometheus ``/metrics`` for operators.

This process's counters (events received, signals sent, provider errors, webhook
verification failures: activities/counters.py), plus numbers that span every process,
read from PostgreSQL at scrape time: messages by channel and status, enrollments by
journey and status, and enrollments started (``rate()`` of it is the enrollment rate).
Not behind the API key, like ``/healthz``: restrict it at the network edge.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import SessionDep

router = APIRouter(tags=["operations"])


class _Snapshot(Collector):
    """Metric families already read from the database (collectors are synchronous)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


@router.get("/metrics", include_in_schema=False)
async def metrics(session: SessionDep) -> Response:
    connection = await session.connection()
    messages = GaugeMetricFamily(
        "nurture_messages", "Messages by channel and current status.", labels=["channel", "status"]
    )
    for channel, state, count in await connection.execute(
        sa.text("SELECT channel, status, count(*) FROM messages GROUP BY channel, status")
    ):
        messages.add_metric([channel, state], count)
    enrollments = GaugeMetricFamily(
        "nurture_enrollments", "Enrollments by journey and status.", labels=["journey", "status"]
    )
    started = CounterMetricFamily(
        "nurture_enrollments_started", "Enrollments started, by journey.", labels=["journey"]
    )
    per_journey: dict[str, int] = {}
    for journey, state, count in await connection.execute(
        sa.text(
            "SELECT j.key, e.status, count(*) FROM enrollments e "
            "JOIN journeys j ON j.id = e.journey_id GROUP BY j.key, e.status"
        )
    ):
        enrollments.add_metric([journey, state], count)
        per_journey[journey] = per_journey.get(journey, 0) + count
    for journey, count in sorted(per_journey.items()):
        started.add_metric([journey], count)
    database = CollectorRegistry(auto_describe=False)
    database.register(_Snapshot([messages, enrollments, started]))
    body = generate_latest(REGISTRY) + generate_latest(database)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
