"""Provider adapters, one file each, and what they share.

Every adapter has a ``name`` (stored on the message row) and a blocking
``send(message) -> provider message id``, run in a thread by the send activity. A
failed send raises one of the two errors below, so the activity can tell a message
that must be retried from one that never will go.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

from activities.providers.outbox import OutgoingEmail, OutgoingSms


class ProviderRetryable(Exception):
    """The provider could not take the message now (rate limit, outage, network).

    Left to propagate from the activity, so Temporal retries it. ``may_have_reached``
    says the request may have been accepted all the same (a timeout or a reset after
    sending): then the message is never handed over a second time. ``retry_after`` is
    the wait in seconds the provider asked for (``Retry-After``), honoured by the retry.
    """

    def __init__(
        self, detail: str, *, may_have_reached: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.may_have_reached = may_have_reached
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now; None if
    absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def may_have_reached(err: BaseException) -> bool:
    """False only when the connection was provably never made (refused)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return False
        reason = getattr(seen, "reason", None)
        if isinstance(reason, ConnectionRefusedError):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


class ProviderRejected(Exception):
    """The provider refused this message for good; the text says why.

    The send activity records it as the message's failure and the journey goes on.
    """


class EmailProvider(Protocol):
    name: str
    # True when sending the same message id twice delivers it once (the local outbox).
    idempotent: bool

    def send(self, email: OutgoingEmail) -> str | None: ...


class SmsProvider(Protocol):
    name: str
    idempotent: bool

    def send(self, sms: OutgoingSms) -> str | None: ...
