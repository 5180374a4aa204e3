"""Rate limits for the endpoints anyone can call (tracking pixel and clicks, unsubscribe).

A fixed-window counter per bucket (client address, and the token in the path, i.e. one
message) kept in PostgreSQL, so the limit holds across every API process and host: one
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING count`` per bucket, in its own short
transaction so no row lock outlives the statement. Over the limit: 429 with Retry-After
(the seconds left in the window).

The client address is the connection's. Behind a reverse proxy run uvicorn with
``--proxy-headers --forwarded-allow-ips=<proxy>`` so it is the real client's.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

from fastapi import HTTPException, Request, status
from sqlalchemy import text

from models.db import session_scope
from settings import Settings

_COUNT = text(
    "INSERT INTO rate_limit_counters (bucket, window_start, count) VALUES (:bucket, :start, 1) "
    "ON CONFLICT (bucket, window_start) DO UPDATE SET count = rate_limit_counters.count + 1 "
    "RETURNING count"
)
_PRUNE = text("DELETE FROM rate_limit_counters WHERE window_start < :before")
# Old windows are deleted by about one request in this many (cheap: indexed range delete).
PRUNE_ONE_IN = 200


class RateLimited(HTTPException):
    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many {what} requests; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


async def hit(
    settings: Settings, buckets: dict[str, int], window: int, now: datetime | None = None
) -> int | None:
    """Count one request in each bucket (name -> limit); the seconds until the window ends
    if any bucket is over its limit, else None."""
    now = now or datetime.now(UTC)
    epoch = int(now.timestamp())
    start = datetime.fromtimestamp(epoch - epoch % window, UTC)
    over = False
    async with session_scope(settings.database_url) as session:
        connection = await session.connection()
        for bucket, limit in buckets.items():
            count = (await connection.execute(_COUNT, {"bucket": bucket, "start": start})).scalar()
            over = over or (count or 0) > limit
        if random.randrange(PRUNE_ONE_IN) == 0:
            await connection.execute(_PRUNE, {"before": start - timedelta(seconds=window)})
    if not over:
        return None
    return max(1, int((start + timedelta(seconds=window) - now).total_seconds() + 0.999))


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _token_bucket(token: str) -> str:
    # Hashed: the bucket name is stored, and a token is a credential of sorts.
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def limit_tracking(request: Request) -> None:
    """Open pixel and click links: per client address and per token (one message)."""
    await _limit(request, "tracking", "tracking")


async def limit_unsubscribe(request: Request) -> None:
    """Unsubscribe page and one-click POST: per client address and per token."""
    await _limit(request, "unsubscribe", "unsubscribe")


async def _limit(request: Request, kind: str, what: str) -> None:
    settings: Settings = request.app.state.settings
    per_ip = getattr(settings, f"{kind}_rate_limit_per_ip")
    per_token = getattr(settings, f"{kind}_rate_limit_per_token")
    buckets = {f"{kind}:ip:{client_address(request)}": per_ip}
    token = request.path_params.get("token")
    if token:
        buckets[f"{kind}:token:{_token_bucket(str(token))}"] = per_token
    retry_after = await hit(settings, buckets, settings.rate_limit_window_seconds)
    if retry_after is not None:
        raise RateLimited(what, retry_after)
