"""Provider adapters, one file each, and what they share.

Every adapter has a ``name`` (stored on the message row) and a blocking
``send(message) -> provider message id``, run in a thread by the send activity. A
failed send raises one of the two errors below, so the activity can tell a message
that must be retried from one that never will go.
"""

from __future__ import annotations

from typing import Protocol

from activities.providers.outbox import OutgoingEmail, OutgoingSms


class ProviderRetryable(Exception):
    """The provider could not take the message now (rate limit, outage, network).

    Left to propagate from the activity, so Temporal retries it.
    """


class ProviderRejected(Exception):
    """The provider refused this message for good; the text says why.

    The send activity records it as the message's failure and the journey goes on.
    """


class EmailProvider(Protocol):
    name: str

    def send(self, email: OutgoingEmail) -> str | None: ...


class SmsProvider(Protocol):
    name: str

    def send(self, sms: OutgoingSms) -> str | None: ...
