"""Time rules for journeys: time zones, times of day, send windows, dates from contact data.

Everything here runs inside Temporal workflows, so it is pure and deterministic: the
caller passes ``now`` (an aware datetime, UTC in practice), nothing reads the clock, and
the only I/O is ``ZoneInfo(name)`` reading the time zone database.

The rules (see PRODUCT.md, "Time rules"):

* the zone is the contact's, else the journey's default, else UTC; an empty or unknown
  name counts as absent and a note says what was ignored;
* weekdays are judged in that local zone, not in UTC;
* times compare to the second (microseconds of ``now`` are dropped), and a moment exactly
  on a boundary counts as reached;
* a local time that does not exist (DST gap) moves forward to the next valid minute; an
  ambiguous local time (DST fold) means its first occurrence.

Moments computed from ``now`` (``next_time_of_day``, ``window_opens_at``,
``moment_from_value``) come back in UTC, so a timer is simply ``moment - now``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_WEEKDAYS = frozenset(range(7))

_CLOCK = re.compile(r"^([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?$")
_ONE_MINUTE = timedelta(minutes=1)
_ONE_DAY = timedelta(days=1)
# The longest gap on record is a whole day (Samoa, 2011-12-30); search a little further.
_GAP_SEARCH_LIMIT = 2 * 24 * 60
_MICROSECONDS_PER_DAY = 86_400_000_000


# --- parsing --------------------------------------------------------------------------


def parse_weekdays(names: list[str] | None) -> frozenset[int]:
    """Weekday names (``mon`` … ``sun``, any case) as ``date.weekday()`` numbers (Monday = 0).

    ``None`` means every day; an empty list or an unknown name raises ValueError.
    """
    if names is None:
        return ALL_WEEKDAYS
    if len(names) == 0:
        raise ValueError("weekdays may not be empty: leave them out to allow every day")
    days: set[int] = set()
    for name in names:
        key = name.strip().lower() if isinstance(name, str) else ""
        if key not in WEEKDAYS:
            raise ValueError(f"unknown weekday {name!r}: use {', '.join(WEEKDAYS)}")
        days.add(WEEKDAYS.index(key))
    return frozenset(days)


def parse_clock(text: str) -> time:
    """A local time of day written ``HH:MM`` or ``HH:MM:SS`` (24-hour clock)."""
    match = _CLOCK.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid time of day {text!r}: use HH:MM or HH:MM:SS, e.g. 09:00")
    hour, minute, second = (int(part) if part else 0 for part in match.groups())
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(
            f"invalid time of day {text!r}: hours run 00-23, minutes and seconds 00-59"
        )
    return time(hour, minute, second)


# --- zones and local times -------------------------------------------------------------


def _load_zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def resolve_zone(contact_zone: str | None, default_zone: str | None) -> tuple[ZoneInfo, str | None]:
    """The contact's zone, else the journey's default, else UTC, and a note of what was ignored.

    An empty or unknown name counts as absent; the note (None when nothing was ignored)
    says so in plain words, e.g. ``contact time zone 'Mars/Base' is unknown; using UTC``.
    Surrounding whitespace in a name is ignored.
    """
    ignored: list[str] = []
    for label, name in (
        ("contact time zone", contact_zone),
        ("journey default time zone", default_zone),
    ):
        if name is None:
            continue
        if isinstance(name, str) and not name.strip():
            ignored.append(f"{label} is empty")
            continue
        zone = _load_zone(name.strip()) if isinstance(name, str) else None
        if zone is None:
            ignored.append(f"{label} {name!r} is unknown")
            continue
        return zone, _note(ignored, zone)
    utc = ZoneInfo("UTC")
    return utc, _note(ignored, utc)


def _note(ignored: list[str], zone: ZoneInfo) -> str | None:
    return f"{'; '.join(ignored)}; using {zone.key}" if ignored else None


def _exists(wall: datetime, zone: ZoneInfo) -> bool:
    """Whether a naive wall time happens at all in ``zone`` (False inside a DST gap)."""
    there_and_back = wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)
    return there_and_back.replace(tzinfo=None) == wall


def local_moment(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """The wall time ``clock`` on ``day`` in ``zone``, as an aware datetime in ``zone``.

    A wall time that does not exist (DST gap) moves forward to the next valid minute
    (02:30 on a US spring-forward day becomes 03:00); an ambiguous one (DST fold) is its
    first occurrence (``fold=0``).
    """
    wall = datetime.combine(day, clock.replace(tzinfo=None))
    if not _exists(wall, zone):
        wall = wall.replace(second=0, microsecond=0)
        for _ in range(_GAP_SEARCH_LIMIT):
            wall += _ONE_MINUTE
            if _exists(wall, zone):
                break
        else:  # pragma: no cover - no zone has a gap this long
            raise ValueError(f"no valid local time after {day} {clock} in {zone.key}")
    return wall.replace(tzinfo=zone, fold=0)


def _to_second(now: datetime) -> datetime:
    """``now`` in UTC with microseconds dropped: all comparisons are to the second."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be an aware datetime, got {now!r}")
    return now.astimezone(UTC).replace(microsecond=0)


def _check_weekdays(weekdays: frozenset[int]) -> None:
    if not weekdays:
        raise ValueError("weekdays may not be empty: leave them out to allow every day")
    if not weekdays <= ALL_WEEKDAYS:
        raise ValueError(f"weekdays must be numbers 0 (Monday) to 6 (Sunday), got {set(weekdays)}")


def next_time_of_day(
    now: datetime, zone: ZoneInfo, clock: time, weekdays: frozenset[int]
) -> datetime:
    """The earliest moment >= ``now`` (to the second) at local ``clock`` on an allowed weekday.

    The weekday is the local one in ``zone``. Exactly on the moment returns ``now``
    (without microseconds). On a fall-back day only the first occurrence of an ambiguous
    ``clock`` counts, so a daily time never fires twice. The result is in UTC.
    """
    _check_weekdays(weekdays)
    current = _to_second(now)
    # Start a day early: the local date may lag UTC, and a DST gap can push a moment forward.
    day = current.astimezone(zone).date() - _ONE_DAY
    for _ in range(9):
        if day.weekday() in weekdays:
            moment = local_moment(day, clock, zone).astimezone(UTC)
            if moment >= current:
                return moment
        day += _ONE_DAY
    raise AssertionError("unreachable: some allowed weekday falls within nine days")


# --- absolute moments and dates from contact data ---------------------------------------


def _parse_iso(text: str) -> date | datetime:
    """An ISO 8601 date (returned as ``date``) or date-time (returned as ``datetime``)."""
    cleaned = text.strip()
    try:
        return date.fromisoformat(cleaned)
    except ValueError:
        pass
    return datetime.fromisoformat(cleaned)


def moment_at(text: str, zone: ZoneInfo) -> datetime:
    """The moment of ``until {at: ...}``: an ISO 8601 date-time, or a date (local midnight).

    Values without an offset are local times in ``zone`` (DST gap and fold rules apply);
    values with an offset (``Z``, ``+02:00``) keep it.
    """
    try:
        value = _parse_iso(text) if isinstance(text, str) else None
    except (ValueError, OverflowError):
        value = None
    if value is None:
        raise ValueError(
            f"invalid moment {text!r}: use an ISO 8601 date-time (2026-12-01T09:00) or date"
        )
    if not isinstance(value, datetime):
        return local_moment(value, time(0), zone)
    if value.tzinfo is not None:
        return value
    return local_moment(value.date(), value.time(), zone)


def _split_offset(offset: timedelta) -> tuple[int, timedelta]:
    """Whole days (moved on the local calendar) and the rest (elapsed time), same sign."""
    micros = offset // timedelta(microseconds=1)
    sign = -1 if micros < 0 else 1
    days, rest = divmod(abs(micros), _MICROSECONDS_PER_DAY)
    return sign * days, timedelta(microseconds=sign * rest)


def _anniversary(original: date, year: int) -> date:
    """``original``'s month and day in ``year``; Feb 29 falls on Feb 28 in other years."""
    try:
        return original.replace(year=year)
    except ValueError:
        return original.replace(year=year, day=28)


def moment_from_value(
    value: object,
    zone: ZoneInfo,
    *,
    now: datetime,
    offset: timedelta = timedelta(0),
    clock: time | None = None,
    yearly: bool = False,
    label: str = "value",
) -> tuple[datetime | None, str | None]:
    """The moment of ``until {attr|prop: ..., offset, time, yearly}``, or None and a reason.

    ``value`` is an ISO 8601 date or date-time (string, ``date`` or ``datetime``). A date
    is a local date at midnight, or at ``clock`` when given; a date-time keeps its instant,
    or with ``clock`` takes its local date at ``clock``. ``yearly`` takes the first
    anniversary (not before the date itself) whose final moment is >= ``now``; Feb 29
    falls on Feb 28 in other years. The whole days of ``offset`` move the local date
    (wall time kept: "the day before at 09:00"); the rest is elapsed time ("2 hours
    before"). A past moment is returned as it is. The moment is in UTC; ``label`` names
    the value in the reason (``attribute birthday``).
    """
    current = _to_second(now)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"{label} is missing"
    parsed: date | datetime | None
    if isinstance(value, date):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = _parse_iso(value)
        except (ValueError, OverflowError):
            parsed = None
    else:
        parsed = None
    if parsed is None:
        return None, f"{label} {value!r} is not an ISO 8601 date or date-time"

    days, elapsed = _split_offset(offset)
    try:
        if isinstance(parsed, datetime):
            if parsed.tzinfo is not None and parsed.utcoffset() is not None:
                instant = parsed.astimezone(UTC)
                local = instant.astimezone(zone)
            else:
                local = local_moment(parsed.date(), parsed.time(), zone)
                instant = local.astimezone(UTC)
            if clock is None and days == 0 and not yearly:
                # Keep the exact instant (also the second pass of an ambiguous time).
                return instant + elapsed, None
            base_day, base_clock = local.date(), clock or local.time().replace(tzinfo=None)
        else:
            base_day, base_clock = parsed, clock or time(0)

        def resolve(day: date) -> datetime:
            moved = day + timedelta(days=days)
            return local_moment(moved, base_clock, zone).astimezone(UTC) + elapsed

        if not yearly:
            return resolve(base_day), None
        year = max(base_day.year, current.astimezone(zone).year - abs(days) // 365 - 2)
        while True:
            moment = resolve(_anniversary(base_day, year))
            if moment >= current:
                return moment, None
            year += 1
    except (OverflowError, ValueError):
        return None, f"{label} {value!r} is out of range for a date"


# --- send windows ---------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A send window: local times ``start``-``end`` on allowed weekdays (Monday = 0).

    ``end`` before ``start`` spans midnight (22:00-02:00); the weekday that counts is the
    day the window opened. Both boundaries are inside, to the second.
    """

    start: time
    end: time
    weekdays: frozenset[int]

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError(
                f"window from {self.start.isoformat()} to {self.end.isoformat()} is empty: "
                "from and to must differ"
            )
        _check_weekdays(self.weekdays)

    @property
    def spans_midnight(self) -> bool:
        return self.end < self.start

    @classmethod
    def parse(cls, start: str, end: str, weekdays: list[str] | None) -> Window:
        """A window from its journey fields: ``from``, ``to`` (HH:MM) and weekday names."""
        return cls(parse_clock(start), parse_clock(end), parse_weekdays(weekdays))

    def contains(self, local: datetime) -> bool:
        """Whether a local wall time (to the second) is inside the window."""
        clock = local.time().replace(microsecond=0, tzinfo=None)
        day = local.date()
        if not self.spans_midnight:
            return day.weekday() in self.weekdays and self.start <= clock <= self.end
        if clock >= self.start:
            return day.weekday() in self.weekdays
        if clock <= self.end:
            return (day - _ONE_DAY).weekday() in self.weekdays
        return False


def window_opens_at(now: datetime, window: Window, zone: ZoneInfo) -> datetime:
    """``now`` (to the second) when inside ``window`` in ``zone``, else when it next opens.

    The opening is ``window.start`` on an allowed local weekday, moved forward out of a
    DST gap if need be. The result is in UTC.
    """
    current = _to_second(now)
    if window.contains(current.astimezone(zone)):
        return current
    return next_time_of_day(current, zone, window.start, window.weekdays)
