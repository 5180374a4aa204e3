"""Prometheus counters of this process (API or worker); each process is scraped on its own.

Counts that span processes (messages by status, enrollments) are read from PostgreSQL at
scrape time by the API's ``/metrics`` (api/routes/prometheus.py) instead.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

EVENTS_RECEIVED = Counter(
    "nurture_events_received",
    "Events stored for the first time (duplicates not counted), by source.",
    ["source"],
)
SIGNALS_SENT = Counter(
    "nurture_signals_sent", "Signals delivered to running journey workflows, by name.", ["signal"]
)
PROVIDER_ERRORS = Counter(
    "nurture_provider_errors",
    "Failed provider calls, by channel and kind (rejected: permanent; retryable).",
    ["channel", "kind"],
)
WEBHOOK_VERIFICATION_FAILURES = Counter(
    "nurture_webhook_verification_failures",
    "Provider webhook requests refused for a missing, invalid or stale signature.",
    ["provider"],
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve this process's counters on ``http://host:port/metrics`` (a daemon thread)."""
    start_http_server(port, addr=host)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
