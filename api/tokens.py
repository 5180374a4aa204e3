"""Signed tokens for links in mail (unsubscribe): ``<message id>.<HMAC-SHA256>``.

The HMAC covers ``kind:message_id`` so a token made for one purpose is refused by another.
The key is ``NURTURE_TRACKING_SECRET``, else the API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from settings import Settings


def tracking_key(settings: Settings) -> str:
    key = settings.tracking_secret or settings.api_key
    if not key:
        raise ValueError("set NURTURE_TRACKING_SECRET or NURTURE_API_KEY to sign links in mail")
    return key


def _mac(key: str, kind: str, message_id: str) -> str:
    digest = hmac.new(key.encode(), f"{kind}:{message_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(kind: str, message_id: str, *, key: str) -> str:
    """A URL-safe token naming ``message_id`` for ``kind`` links."""
    return f"{message_id}.{_mac(key, kind, message_id)}"


def verify(kind: str, token: str, *, key: str) -> str | None:
    """The message id a genuine ``kind`` token names, else None (constant-time compare)."""
    message_id, dot, mac = token.rpartition(".")
    if not dot or not message_id or not mac:
        return None
    if not hmac.compare_digest(mac.encode(), _mac(key, kind, message_id).encode()):
        return None
    return message_id
