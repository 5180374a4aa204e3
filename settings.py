"""Nurture's settings: one class, read from the environment (prefix ``NURTURE_``)."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_DIR = Path(__file__).resolve().parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NURTURE_", env_file=None, extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db). "
        "Unset: the run command starts an embedded PostgreSQL in data_dir.",
    )
    data_dir: Path = Field(
        default=PROJECT_DIR / ".nurture",
        description="Where the development defaults keep their state (embedded PostgreSQL, "
        "Temporal dev server database, outbox).",
    )
    temporal_address: str = Field(
        default="127.0.0.1:7233", description="Temporal frontend host:port."
    )
    temporal_namespace: str = Field(default="default", description="Temporal namespace.")
    task_queue: str = Field(
        default="nurture-journeys", description="Task queue of journey workers."
    )
    temporal_ui_url: str = Field(
        default="http://127.0.0.1:8233", description="Temporal UI base URL, for links."
    )
    api_key: str | None = Field(
        default=None,
        description="Key required on /v1 (Authorization: Bearer <key> or X-API-Key). "
        "Unset: the run command generates one and prints it.",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, description="Port the API listens on.")
    public_url: str = Field(
        default="http://127.0.0.1:8000", description="Public base URL of the API (links in mail)."
    )
    tracking_secret: str | None = Field(
        default=None,
        description="HMAC key of the tokens in links in mail (unsubscribe). "
        "Unset: the API key is used.",
    )
    outbox_dir: Path | None = Field(
        default=None, description="Local outbox directory. Unset: <data_dir>/outbox."
    )
    email_provider: Literal["outbox", "sendgrid", "smtp"] = Field(
        default="outbox",
        description="Email provider: outbox (every message saved as an .eml file in "
        "outbox_dir), sendgrid (needs sendgrid_api_key) or smtp (needs smtp_host).",
    )
    sendgrid_api_key: str | None = Field(default=None, description="SendGrid API key.")
    sendgrid_base_url: str = Field(
        default="https://api.sendgrid.com", description="SendGrid API base URL."
    )
    smtp_host: str | None = Field(default=None, description="SMTP server host.")
    smtp_port: int = Field(default=587, description="SMTP server port.")
    smtp_username: str | None = Field(default=None, description="SMTP login user. Unset: no login.")
    smtp_password: str | None = Field(default=None, description="SMTP login password.")
    smtp_starttls: bool = Field(
        default=True, description="Upgrade the SMTP connection with STARTTLS before sending."
    )
    sms_provider: Literal["outbox", "twilio"] = Field(
        default="outbox",
        description="SMS provider: outbox (every text saved as JSON in outbox_dir) or twilio "
        "(needs twilio_account_sid and twilio_auth_token).",
    )
    twilio_account_sid: str | None = Field(default=None, description="Twilio account SID.")
    twilio_auth_token: str | None = Field(default=None, description="Twilio auth token.")
    twilio_base_url: str = Field(
        default="https://api.twilio.com", description="Twilio REST API base URL."
    )
    email_from: str = Field(
        default="Nurture <hello@nurture.localhost>", description="From address of emails."
    )

    sms_from: str = Field(default="+15550100000", description="Sender number of SMS (E.164).")
    sendgrid_webhook_public_key: str | None = Field(
        default=None,
        description="SendGrid Event Webhook verification key (base64 DER, as SendGrid shows "
        "it). Unset: POST /webhooks/sendgrid refuses every request.",
    )
    webhook_secret: str | None = Field(
        default=None,
        description="HMAC key that signs outbound webhook steps (X-Nurture-Signature). "
        "Unset: the run command generates one and keeps it in data_dir.",
    )

    email_daily_cap: int | None = Field(
        default=None,
        ge=1,
        description="At most this many journey emails per contact in any 24 hours; "
        "more are deferred, not dropped. Unset: no cap.",
    )
    sms_daily_cap: int | None = Field(
        default=None, ge=1, description="The same cap for SMS. Unset: no cap."
    )
    email_quiet_hours: str | None = Field(
        default=None,
        pattern=r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}$",
        description="Local hours with no email, e.g. 21:00-08:00; sends wait for the end.",
    )
    sms_quiet_hours: str | None = Field(
        default=None,
        pattern=r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}$",
        description="Local hours with no SMS, e.g. 21:00-08:00 (contact's zone, else the "
        "journey's, else UTC); sends wait for the end.",
    )

    audience_refresh_every: str = Field(
        default="15m",
        pattern=r"^\d+[smhd]$",
        description="How often a Temporal Schedule recomputes scores, lifecycle stages and "
        "segment membership for time-based conditions (e.g. no activity in 30 days).",
    )
    import_max_rows: int = Field(
        default=200_000, ge=1, description="Most rows one contact import may carry."
    )
    import_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="Largest contact import body, in bytes."
    )
    crm_adapter: Literal["none", "webhook", "hubspot"] = Field(
        default="none",
        description="Where sales tasks and CRM updates are synced: none (Nurture's own tables "
        "only), webhook (signed POST to crm_webhook_url) or hubspot (needs hubspot_token).",
    )
    crm_webhook_url: str | None = Field(
        default=None, description="URL the webhook CRM adapter posts tasks and updates to."
    )
    crm_webhook_secret: str | None = Field(
        default=None,
        description="HMAC key signing the webhook CRM adapter's posts. Unset: webhook_secret.",
    )
    hubspot_base_url: str = Field(
        default="https://api.hubapi.com", description="HubSpot API base URL."
    )
    hubspot_token: str | None = Field(
        default=None, description="HubSpot private-app (or OAuth) access token."
    )
    outbound_allow_private: str = Field(
        default="",
        description="Comma-separated hosts or CIDR ranges outbound calls (webhook steps, CRM "
        "adapters) may reach although private or loopback. Empty: only public addresses.",
    )
    # Performance (bench/): what a run costs Temporal, and how a worker uses its machine.
    progress_search_attributes: bool = Field(
        default=False,
        description="Keep the NurtureStep and NurtureStatus search attributes current (one "
        "billable Temporal action per step and one at the end). Off: the step shows in the "
        "run's current details, the outcome in its result and the enrollment.",
    )
    worker_max_cached_workflows: int = Field(
        default=2_000,
        ge=0,
        description="Journey runs a worker keeps in memory (sticky cache, about 200 KiB each); "
        "an evicted run replays its history at its next task, days later for most journeys.",
    )
    worker_max_concurrent_workflow_tasks: int = Field(
        default=50,
        ge=1,
        description="Workflow tasks a worker runs at once. A Python worker is bound to one "
        "core: more only queues work in its event loop until tasks time out.",
    )
    worker_max_concurrent_activities: int = Field(
        default=50, ge=1, description="Activities a worker runs at once."
    )
    worker_workflow_task_pollers: int = Field(
        default=5, ge=2, description="Concurrent workflow task polls of a worker."
    )
    worker_activity_task_pollers: int = Field(
        default=5, ge=1, description="Concurrent activity task polls of a worker."
    )

    # Security: hostile input, rate limits, payload encryption (issue 9, parts 4 to 6).
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest request body, in bytes (contact imports have import_max_bytes).",
    )
    max_json_depth: int = Field(
        default=32, ge=2, description="Deepest nesting of arrays and objects in a JSON body."
    )
    rate_limit_window_seconds: int = Field(
        default=60, ge=1, description="Length of the fixed window the rate limits count in."
    )
    tracking_rate_limit_per_ip: int = Field(
        default=600,
        ge=1,
        description="Open-pixel and click requests one client address may make per window "
        "(mail providers' image proxies fetch many recipients' pixels from few addresses).",
    )
    tracking_rate_limit_per_token: int = Field(
        default=60, ge=1, description="Open-pixel or click requests per link per window."
    )
    unsubscribe_rate_limit_per_ip: int = Field(
        default=60, ge=1, description="Unsubscribe requests one client address may make."
    )
    unsubscribe_rate_limit_per_token: int = Field(
        default=10, ge=1, description="Unsubscribe requests per unsubscribe link per window."
    )
    payload_keys: str = Field(
        default="",
        repr=False,
        description="AES-256-GCM keys that encrypt workflow payloads (contact PII) in "
        "Temporal, as comma-separated kid:base64key; the first encrypts, all decrypt. "
        "Empty: payloads are stored in plain JSON.",
    )
    codec_cors_origins: str = Field(
        default="http://127.0.0.1:8233,http://localhost:8233",
        description="Comma-separated Temporal UI origins allowed to call the codec server.",
    )

    # Dashboard and operator metrics (issue 7).
    dashboard_secret: str | None = Field(
        default=None,
        description="HMAC key signing the dashboard's session cookie. Unset: derived from the "
        "API key (changing the key logs everyone out).",
    )
    dashboard_session_hours: int = Field(
        default=12, ge=1, le=24 * 30, description="How long a dashboard login lasts, in hours."
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port on which each worker serves its Prometheus counters at /metrics. "
        "Unset: off.",
    )
    worker_metrics_host: str = Field(
        default="127.0.0.1", description="Address the worker's metrics port listens on."
    )

    # Campaigns: bulk enrollment and broadcasts.
    bulk_enroll_page_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Contacts one bulk-enrollment page (one activity) takes from the ledger.",
    )
    bulk_enroll_concurrency: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Journeys a bulk-enrollment page starts at once (workflow starts in "
        "flight; a chunk of four times as many shares one database connection).",
    )
    bulk_enroll_max_backlog: int = Field(
        default=200,
        ge=0,
        description="A bulk-enrollment page starts its next chunk only while the task "
        "queue holds at most this many workflow tasks not yet taken by a worker, so a large "
        "job runs at the workers' pace instead of queueing thousands of first tasks ahead of "
        "every other journey's (0: no pacing).",
    )
    broadcast_send_concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Sends one broadcast batch makes at once (the rate limit still holds).",
    )

    @property
    def outbox_path(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in SQLAlchemy's psycopg 3 form."""
        if not self.database_url:
            raise RuntimeError(
                "NURTURE_DATABASE_URL is not set; the run command sets it after starting "
                "the embedded PostgreSQL"
            )
        return to_sqlalchemy_url(self.database_url)


def to_sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url!r} (PostgreSQL is the only supported database)")


def generate_api_key() -> str:
    return "nk_" + secrets.token_urlsafe(24)


@lru_cache
def get_settings() -> Settings:
    return Settings()
