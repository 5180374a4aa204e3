"""Twilio Programmable Messaging through the official ``twilio`` SDK."""

from __future__ import annotations

from requests import RequestException
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from activities.providers import ProviderRejected, ProviderRetryable, may_have_reached
from activities.providers.outbox import OutgoingSms

DEFAULT_BASE_URL = "https://api.twilio.com"

# Twilio error codes that no retry will change.
UNSUBSCRIBED = 21610  # the recipient replied STOP
INVALID_NUMBERS = {21211, 21614}  # not a valid phone number / not a mobile number


class TwilioSmsProvider:
    name = "twilio"
    idempotent = False

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_number: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
    ) -> None:
        self.client = Client(account_sid, auth_token, http_client=TwilioHttpClient(timeout=timeout))
        # The Api domain keeps its host in ``base_url``; every Messages call is built on it.
        self.client.api.base_url = base_url.rstrip("/")
        self.from_number = from_number

    def send(self, sms: OutgoingSms) -> str | None:
        """Create the message at Twilio; return its SID."""
        try:
            message = self.client.messages.create(to=sms.to, from_=self.from_number, body=sms.body)
        except TwilioRestException as err:
            detail = f"Twilio answered HTTP {err.status} (error {err.code}): {err.msg}"
            if err.code == UNSUBSCRIBED or err.code in INVALID_NUMBERS:
                raise ProviderRejected(detail) from None
            if err.status == 429 or err.status >= 500:
                raise ProviderRetryable(detail) from None
            raise ProviderRejected(detail) from None
        except (RequestException, OSError) as err:
            raise ProviderRetryable(
                f"Twilio unreachable: {err}", may_have_reached=may_have_reached(err)
            ) from err
        return message.sid
