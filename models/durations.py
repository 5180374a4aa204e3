"""Durations as marketers write them: ``15m``, ``3d``, ``1h30m``, ``2w``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+[smhdw])+$")


def parse_duration(text: str) -> timedelta:
    """Parse ``<n><unit>`` parts (s, m, h, d, w) into a timedelta; raise ValueError otherwise."""
    cleaned = text.strip().lower().replace(" ", "")
    if not _WHOLE.match(cleaned):
        raise ValueError(
            f"invalid duration {text!r}: use numbers with units s, m, h, d or w (15m, 3d, 1h30m)"
        )
    total = timedelta()
    for amount, unit in _PART.findall(cleaned):
        total += timedelta(**{_UNITS[unit]: int(amount)})
    if total <= timedelta():
        raise ValueError(f"invalid duration {text!r}: must be longer than zero")
    return total


def format_duration(value: timedelta) -> str:
    """Plain words for a timedelta, for labels in the Temporal UI (``3 days 4 hours``)."""
    seconds = int(value.total_seconds())
    parts = []
    for name, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'s' if count != 1 else ''}")
    if seconds or not parts:
        parts.append(f"{seconds} second{'s' if seconds != 1 else ''}")
    return " ".join(parts)
