"""Signed tokens for links in mail: ``<message id>.<HMAC-SHA256>`` (unsubscribe, open pixel).

The HMAC covers ``kind:message_id`` so a token made for one purpose is refused by another.
Click links sign ``<message id>|<url>`` instead (``sign_url``/``verify_url``).
The key is ``NURTURE_TRACKING_SECRET``, else the API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from html import unescape

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


def sign_url(kind: str, message_id: str, url: str, *, key: str) -> str:
    """A URL-safe token naming ``message_id`` and ``url`` (click tracking): ``<b64 payload>.<mac>``.

    The HMAC covers ``kind:<message_id>|<url>``, so neither the message nor the target can be
    swapped without the key.
    """
    payload = f"{message_id}|{url}"
    encoded = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    return f"{encoded}.{_mac(key, kind, payload)}"


def verify_url(kind: str, token: str, *, key: str) -> tuple[str, str] | None:
    """``(message_id, url)`` a genuine ``kind`` url token names, else None."""
    encoded, dot, mac = token.rpartition(".")
    if not dot or not encoded or not mac:
        return None
    try:
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not hmac.compare_digest(mac.encode(), _mac(key, kind, payload).encode()):
        return None
    message_id, bar, url = payload.partition("|")
    if not bar or not message_id or not url:
        return None
    return message_id, url


# href="http(s)://..." or href='http(s)://...' in an HTML attribute position.
_HREF = re.compile(
    r"""(?P<prefix>\bhref\s*=\s*)(?P<quote>["'])(?P<url>https?://[^"'<>\s]*?)(?P=quote)""",
    re.IGNORECASE,
)


def track_html(html: str, *, base_url: str, message_id: str, key: str, skip: str = "") -> str:
    """``html`` with each http(s) link routed through ``/t/c/{token}`` and an open pixel.

    Links whose unescaped URL equals ``skip`` (the unsubscribe URL) are left alone.
    """
    base = base_url.rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        url = unescape(match["url"])
        if url == skip:
            return match.group(0)
        token = sign_url("click", message_id, url, key=key)
        return f"{match['prefix']}{match['quote']}{base}/t/c/{token}{match['quote']}"

    tracked = _HREF.sub(rewrite, html)
    pixel = (
        f'<img src="{base}/t/o/{sign("open", message_id, key=key)}.gif" '
        'width="1" height="1" alt="">'
    )
    index = tracked.lower().rfind("</body>")
    if index == -1:
        return f"{tracked}\n{pixel}"
    return f"{tracked[:index]}{pixel}{tracked[index:]}"
