"""SendGrid (v3 Mail Send) through the official ``sendgrid`` SDK.

Our message id and the journey, step and variant travel in ``custom_args``, so every
Event Webhook event names the message it is about; each journey is a category, so
SendGrid's own statistics split by journey.
"""

from __future__ import annotations

import json
from typing import Any

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Category, CustomArg, Header, Mail

from activities.providers import (
    ProviderRejected,
    ProviderRetryable,
    may_have_reached,
    retry_after_seconds,
)
from activities.providers.outbox import OutgoingEmail

DEFAULT_BASE_URL = "https://api.sendgrid.com"


class SendGridEmailProvider:
    name = "sendgrid"
    idempotent = False

    def __init__(
        self, api_key: str, base_url: str = DEFAULT_BASE_URL, timeout: float = 30.0
    ) -> None:
        self.client = SendGridAPIClient(api_key, host=base_url.rstrip("/"))
        # The SDK waits forever by default; the activity has a minute in all.
        self.client.client.timeout = timeout

    def mail(self, email: OutgoingEmail) -> Mail:
        mail = Mail(
            from_email=email.sender,
            to_emails=email.to,
            subject=email.subject,
            plain_text_content=email.text or None,
            html_content=email.html or None,
        )
        tags = {
            "nurture_message_id": email.message_id,
            "journey": email.journey_key,
            "step": email.step_id,
            "variant": email.variant,
        }
        mail.custom_arg = [CustomArg(key, value) for key, value in tags.items() if value]
        if email.journey_key:
            mail.category = Category(f"journey:{email.journey_key}")
        if email.headers:
            mail.header = [Header(key, value) for key, value in email.headers.items()]
        return mail

    def send(self, email: OutgoingEmail) -> str | None:
        """Hand the message to SendGrid; return its ``X-Message-Id``."""
        try:
            response = self.client.send(self.mail(email))
        except HTTPError as err:
            status = int(err.status_code)
            detail = f"SendGrid answered HTTP {status}: {_error_text(err.body)}"
            if status == 429 or status >= 500:
                headers = err.headers or {}
                raise ProviderRetryable(
                    detail, retry_after=retry_after_seconds(headers.get("Retry-After"))
                ) from None
            raise ProviderRejected(detail) from None
        except OSError as err:  # refused, reset, timed out, DNS: try again later
            raise ProviderRetryable(
                f"SendGrid unreachable: {err}", may_have_reached=may_have_reached(err)
            ) from err
        message_id = response.headers.get("X-Message-Id")
        return str(message_id) if message_id else None


def _error_text(body: Any) -> str:
    """SendGrid's ``errors[].message`` (with the field it names), else the raw body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        errors = json.loads(text)["errors"]
        return "; ".join(
            f"{e['field']}: {e['message']}" if e.get("field") else str(e["message"]) for e in errors
        )
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500] or "(no body)"
