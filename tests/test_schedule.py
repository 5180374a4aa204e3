"""Time rules: zones, weekdays in local time, DST gaps and folds, boundaries, send windows,
absolute moments and dates taken from contact data."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from models.schedule import (
    WEEKDAYS,
    Window,
    local_moment,
    moment_at,
    moment_from_value,
    next_time_of_day,
    parse_clock,
    parse_weekdays,
    resolve_zone,
    window_opens_at,
)

NY = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
WORKDAYS = parse_weekdays(["mon", "tue", "wed", "thu", "fri"])
EVERY_DAY = parse_weekdays(None)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def ny(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    """A New York wall time as a UTC moment (never ambiguous in these tests)."""
    return datetime(year, month, day, hour, minute, second, tzinfo=NY).astimezone(UTC)


# --- zones ----------------------------------------------------------------------------


def test_resolve_zone_prefers_contact_zone() -> None:
    assert resolve_zone("Europe/London", "America/New_York") == (LONDON, None)


def test_resolve_zone_falls_back_to_journey_default() -> None:
    assert resolve_zone(None, "America/New_York") == (NY, None)


def test_resolve_zone_falls_back_to_utc() -> None:
    zone, note = resolve_zone(None, None)
    assert zone.key == "UTC"
    assert note is None


def test_resolve_zone_unknown_contact_zone_is_noted() -> None:
    zone, note = resolve_zone("Mars/Base", "America/New_York")
    assert zone == NY
    assert note == "contact time zone 'Mars/Base' is unknown; using America/New_York"


@pytest.mark.parametrize("blank", ["", "   "])
def test_resolve_zone_empty_contact_zone_is_noted(blank: str) -> None:
    zone, note = resolve_zone(blank, "America/New_York")
    assert zone == NY
    assert note == "contact time zone is empty; using America/New_York"


def test_resolve_zone_both_unusable_uses_utc_and_notes_both() -> None:
    zone, note = resolve_zone("Mars/Base", "")
    assert zone.key == "UTC"
    assert note == (
        "contact time zone 'Mars/Base' is unknown; journey default time zone is empty; using UTC"
    )


def test_resolve_zone_unknown_default_without_contact_zone_is_noted() -> None:
    zone, note = resolve_zone(None, "Moon/Crater")
    assert zone.key == "UTC"
    assert note == "journey default time zone 'Moon/Crater' is unknown; using UTC"


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/localtime", "America", "utc"])
def test_resolve_zone_odd_names_count_as_unknown(name: str) -> None:
    zone, note = resolve_zone(name, None)
    assert zone.key == "UTC"
    assert note == f"contact time zone {name!r} is unknown; using UTC"


def test_resolve_zone_ignores_surrounding_whitespace() -> None:
    assert resolve_zone(" Europe/London ", None) == (LONDON, None)


# --- weekdays and clocks --------------------------------------------------------------


def test_parse_weekdays_none_means_every_day() -> None:
    assert parse_weekdays(None) == frozenset(range(7))
    assert len(WEEKDAYS) == 7


def test_parse_weekdays_names_map_to_date_weekday() -> None:
    assert parse_weekdays(["mon", "FRI", " sun "]) == {0, 4, 6}
    assert date(2026, 11, 23).weekday() in parse_weekdays(["mon"])


def test_parse_weekdays_empty_list_raises() -> None:
    with pytest.raises(ValueError, match="weekdays may not be empty"):
        parse_weekdays([])


@pytest.mark.parametrize("name", ["funday", "monday", "", "lun"])
def test_parse_weekdays_unknown_name_raises_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"unknown weekday {name!r}")):
        parse_weekdays(["mon", name])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("09:00", time(9)),
        ("9:05", time(9, 5)),
        ("23:59:59", time(23, 59, 59)),
        ("00:00", time(0)),
        (" 18:30 ", time(18, 30)),
    ],
)
def test_parse_clock_reads_hours_minutes_seconds(text: str, expected: time) -> None:
    assert parse_clock(text) == expected


@pytest.mark.parametrize(
    "text", ["", "9", "0900", "09:0", "09:60", "24:00", "12:00:60", "09:00:00:00", "nine", "9am"]
)
def test_parse_clock_refuses_nonsense_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid time of day {text!r}")):
        parse_clock(text)


# --- local moments: DST gap and fold --------------------------------------------------


def test_local_moment_is_an_aware_local_time() -> None:
    moment = local_moment(date(2026, 6, 1), time(9), NY)
    assert moment.tzinfo is NY
    assert moment.astimezone(UTC) == utc(2026, 6, 1, 13)


def test_local_moment_gap_moves_forward_new_york() -> None:
    moment = local_moment(date(2026, 3, 8), time(2, 30), NY)
    assert (moment.hour, moment.minute) == (3, 0)
    assert moment.utcoffset() == timedelta(hours=-4)
    assert moment.astimezone(UTC) == utc(2026, 3, 8, 7)


def test_local_moment_gap_moves_forward_london() -> None:
    moment = local_moment(date(2026, 3, 29), time(1, 30), LONDON)
    assert (moment.hour, moment.minute) == (2, 0)
    assert moment.astimezone(UTC) == utc(2026, 3, 29, 1)


def test_local_moment_gap_drops_seconds_to_next_valid_minute() -> None:
    moment = local_moment(date(2026, 3, 8), time(2, 59, 45), NY)
    assert moment.astimezone(UTC) == utc(2026, 3, 8, 7)


def test_local_moment_fold_takes_first_occurrence() -> None:
    moment = local_moment(date(2026, 11, 1), time(1, 30), NY)
    assert moment.fold == 0
    assert moment.utcoffset() == timedelta(hours=-4)
    assert moment.astimezone(UTC) == utc(2026, 11, 1, 5, 30)


# --- until {time, weekdays} -----------------------------------------------------------


def test_next_time_of_day_later_today() -> None:
    now = ny(2026, 6, 1, 8)  # Monday 08:00
    assert next_time_of_day(now, NY, time(9), EVERY_DAY) == ny(2026, 6, 1, 9)


def test_next_time_of_day_exactly_on_boundary_returns_now() -> None:
    now = ny(2026, 6, 1, 9)
    assert next_time_of_day(now, NY, time(9), EVERY_DAY) == now


def test_next_time_of_day_drops_microseconds_of_now() -> None:
    now = ny(2026, 6, 1, 9).replace(microsecond=999_999)
    assert next_time_of_day(now, NY, time(9), EVERY_DAY) == ny(2026, 6, 1, 9)


def test_next_time_of_day_one_second_late_waits_for_next_day() -> None:
    now = ny(2026, 6, 1, 9, 0, 1)
    assert next_time_of_day(now, NY, time(9), EVERY_DAY) == ny(2026, 6, 2, 9)


def test_next_time_of_day_skips_disallowed_weekdays() -> None:
    now = ny(2026, 6, 5, 10)  # Friday, after 09:00
    assert next_time_of_day(now, NY, time(9), WORKDAYS) == ny(2026, 6, 8, 9)  # Monday


def test_next_time_of_day_judges_weekday_in_local_zone() -> None:
    now = utc(2026, 11, 23, 2)  # Monday in UTC, Sunday 21:00 in New York
    sunday_evening = next_time_of_day(now, NY, time(22), parse_weekdays(["sun"]))
    assert sunday_evening == ny(2026, 11, 22, 22)
    monday_morning = next_time_of_day(now, NY, time(9), parse_weekdays(["mon"]))
    assert monday_morning == ny(2026, 11, 23, 9)


def test_next_time_of_day_in_dst_gap_moves_forward() -> None:
    now = ny(2026, 3, 8, 0, 0)
    assert next_time_of_day(now, NY, time(2, 30), EVERY_DAY) == utc(2026, 3, 8, 7)
    now = datetime(2026, 3, 29, 0, 0, tzinfo=LONDON).astimezone(UTC)
    assert next_time_of_day(now, LONDON, time(1, 30), EVERY_DAY) == utc(2026, 3, 29, 1)


def test_next_time_of_day_fold_counts_first_occurrence_only() -> None:
    first_pass = utc(2026, 11, 1, 5, 30)  # 01:30 EDT
    before = utc(2026, 11, 1, 5)
    assert next_time_of_day(before, NY, time(1, 30), EVERY_DAY) == first_pass
    during_repeat = utc(2026, 11, 1, 5, 45)  # 01:45 EDT; 01:30 EST comes again later
    assert next_time_of_day(during_repeat, NY, time(1, 30), EVERY_DAY) == ny(2026, 11, 2, 1, 30)


def test_next_time_of_day_result_is_utc() -> None:
    result = next_time_of_day(ny(2026, 6, 1, 8), NY, time(9), EVERY_DAY)
    assert result.tzinfo is UTC


def test_next_time_of_day_refuses_naive_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_time_of_day(datetime(2026, 6, 1, 8), NY, time(9), EVERY_DAY)


def test_next_time_of_day_refuses_empty_weekdays() -> None:
    with pytest.raises(ValueError, match="weekdays may not be empty"):
        next_time_of_day(ny(2026, 6, 1, 8), NY, time(9), frozenset())


# --- until {at} -----------------------------------------------------------------------


def test_moment_at_naive_is_in_contact_zone() -> None:
    moment = moment_at("2026-12-01T09:00", NY)
    assert moment.tzinfo is NY
    assert moment.astimezone(UTC) == utc(2026, 12, 1, 14)


@pytest.mark.parametrize(
    ("text", "offset", "instant"),
    [
        ("2026-12-01T09:00+01:00", timedelta(hours=1), utc(2026, 12, 1, 8)),
        ("2026-12-01T09:00:00Z", timedelta(0), utc(2026, 12, 1, 9)),
        ("2026-12-01T09:00-08:00", timedelta(hours=-8), utc(2026, 12, 1, 17)),
    ],
)
def test_moment_at_with_offset_keeps_it(text: str, offset: timedelta, instant: datetime) -> None:
    moment = moment_at(text, NY)
    assert moment.utcoffset() == offset
    assert moment == instant


def test_moment_at_date_is_local_midnight() -> None:
    assert moment_at("2026-12-01", NY).astimezone(UTC) == utc(2026, 12, 1, 5)


def test_moment_at_in_dst_gap_moves_forward() -> None:
    assert moment_at("2026-03-08T02:30", NY).astimezone(UTC) == utc(2026, 3, 8, 7)


@pytest.mark.parametrize("text", ["", "next tuesday", "2026-13-01", "2026-12-01T25:00", "09:00"])
def test_moment_at_refuses_garbage_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid moment {text!r}")):
        moment_at(text, NY)


# --- until {attr|prop, offset, time, yearly} ------------------------------------------


def birthday(now: datetime, value: object = "1990-05-10") -> tuple[datetime | None, str | None]:
    """``until {attr: birthday, offset: -1d, time: "09:00", yearly: true}``."""
    return moment_from_value(
        value, NY, now=now, offset=timedelta(days=-1), clock=time(9), yearly=True
    )


def test_moment_from_value_birthday_before_this_years_anniversary() -> None:
    assert birthday(utc(2026, 3, 1)) == (ny(2026, 5, 9, 9), None)


def test_moment_from_value_birthday_after_this_years_anniversary() -> None:
    assert birthday(utc(2026, 6, 1)) == (ny(2027, 5, 9, 9), None)


def test_moment_from_value_birthday_judged_after_offset_and_clock() -> None:
    # The birthday itself is still ahead, but the day-before-at-09:00 moment has passed.
    assert birthday(ny(2026, 5, 9, 12)) == (ny(2027, 5, 9, 9), None)


def test_moment_from_value_birthday_exactly_on_boundary() -> None:
    assert birthday(ny(2026, 5, 9, 9)) == (ny(2026, 5, 9, 9), None)
    assert birthday(ny(2026, 5, 9, 9, 0, 1)) == (ny(2027, 5, 9, 9), None)


def test_moment_from_value_feb_29_falls_on_feb_28_in_common_years() -> None:
    moment, reason = moment_from_value(
        "2000-02-29", NY, now=utc(2026, 1, 15), clock=time(9), yearly=True
    )
    assert (moment, reason) == (ny(2026, 2, 28, 9), None)
    moment, _ = moment_from_value("2000-02-29", NY, now=utc(2027, 3, 1), clock=time(9), yearly=True)
    assert moment == ny(2028, 2, 29, 9)


def test_moment_from_value_yearly_never_before_the_date_itself() -> None:
    moment, _ = moment_from_value("2028-07-01", NY, now=utc(2026, 1, 1), yearly=True)
    assert moment == ny(2028, 7, 1)


def test_moment_from_value_accepts_date_and_datetime_objects() -> None:
    assert birthday(utc(2026, 3, 1), date(1990, 5, 10)) == (ny(2026, 5, 9, 9), None)
    moment, _ = moment_from_value(datetime(2026, 6, 10, 15, tzinfo=UTC), NY, now=utc(2026, 1, 1))
    assert moment == utc(2026, 6, 10, 15)


def test_moment_from_value_prop_datetime_minus_two_hours() -> None:
    # until {prop: appointment_at, offset: -2h}
    for value in ("2026-06-10T15:00:00-04:00", "2026-06-10T15:00"):
        moment, reason = moment_from_value(
            value, NY, now=utc(2026, 6, 1), offset=timedelta(hours=-2)
        )
        assert (moment, reason) == (utc(2026, 6, 10, 17), None)


def test_moment_from_value_hours_offset_is_elapsed_time_across_dst() -> None:
    # 04:00 EDT on spring-forward day minus 2 real hours is 01:00 EST, not the missing 02:00.
    moment, _ = moment_from_value(
        "2026-03-08T04:00", NY, now=utc(2026, 1, 1), offset=timedelta(hours=-2)
    )
    assert moment == utc(2026, 3, 8, 6)


def test_moment_from_value_days_offset_keeps_local_wall_time_across_dst() -> None:
    moment, _ = moment_from_value(
        "2026-03-09", NY, now=utc(2026, 1, 1), offset=timedelta(days=-2), clock=time(9)
    )
    assert moment == ny(2026, 3, 7, 9)  # 09:00 EST, though 48 elapsed hours would be 08:00


def test_moment_from_value_date_without_clock_is_local_midnight() -> None:
    moment, _ = moment_from_value("2026-12-01", NY, now=utc(2026, 1, 1))
    assert moment == ny(2026, 12, 1, 0)


def test_moment_from_value_datetime_with_clock_takes_its_local_date() -> None:
    # 02:00 UTC on July 4 is still July 3 in New York.
    moment, _ = moment_from_value("2026-07-04T02:00:00Z", NY, now=utc(2026, 1, 1), clock=time(9))
    assert moment == ny(2026, 7, 3, 9)


def test_moment_from_value_keeps_exact_instant_in_fold() -> None:
    moment, _ = moment_from_value("2026-11-01T01:30:00-05:00", NY, now=utc(2026, 1, 1))
    assert moment == utc(2026, 11, 1, 6, 30)


def test_moment_from_value_past_moment_is_returned_as_is() -> None:
    moment, reason = moment_from_value(
        "2020-01-01T09:00:00Z", NY, now=utc(2026, 6, 1), offset=timedelta(hours=-2)
    )
    assert (moment, reason) == (utc(2020, 1, 1, 7), None)


def test_moment_from_value_result_is_utc() -> None:
    moment, _ = moment_from_value("2026-12-01T09:00", NY, now=utc(2026, 1, 1))
    assert moment is not None
    assert moment.tzinfo is UTC


@pytest.mark.parametrize("value", [None, "", "   "])
def test_moment_from_value_missing_returns_reason(value: object) -> None:
    assert moment_from_value(value, NY, now=utc(2026, 1, 1), label="attribute birthday") == (
        None,
        "attribute birthday is missing",
    )


@pytest.mark.parametrize("value", ["soon", "1990-02-30", "10/05/1990", 1700000000, True, [1]])
def test_moment_from_value_garbage_returns_reason(value: object) -> None:
    moment, reason = moment_from_value(value, NY, now=utc(2026, 1, 1))
    assert moment is None
    assert reason == f"value {value!r} is not an ISO 8601 date or date-time"


def test_moment_from_value_reason_names_the_attribute() -> None:
    _, reason = moment_from_value("soon", NY, now=utc(2026, 1, 1), label="attribute birthday")
    assert reason == "attribute birthday 'soon' is not an ISO 8601 date or date-time"


def test_moment_from_value_out_of_range_returns_reason() -> None:
    moment, reason = moment_from_value(
        "9999-12-31", NY, now=utc(2026, 1, 1), offset=timedelta(days=1)
    )
    assert moment is None
    assert reason == "value '9999-12-31' is out of range for a date"


# --- send windows ---------------------------------------------------------------------


def office_hours() -> Window:
    return Window.parse("09:00", "18:00", ["mon", "tue", "wed", "thu", "fri"])


def test_window_parse_reads_fields() -> None:
    window = office_hours()
    assert window == Window(time(9), time(18), WORKDAYS)
    assert not window.spans_midnight
    assert Window.parse("22:00", "02:00", None).spans_midnight
    with pytest.raises(FrozenInstanceError):
        window.start = time(8)  # type: ignore[misc]


def test_window_parse_equal_start_and_end_raises() -> None:
    with pytest.raises(ValueError, match="09:00:00 is empty"):
        Window.parse("09:00", "09:00:00", None)


def test_window_parse_bad_values_raise_naming_them() -> None:
    with pytest.raises(ValueError, match=re.escape("invalid time of day '9h'")):
        Window.parse("9h", "18:00", None)
    with pytest.raises(ValueError, match=re.escape("unknown weekday 'weekend'")):
        Window.parse("09:00", "18:00", ["weekend"])
    with pytest.raises(ValueError, match="weekdays may not be empty"):
        Window.parse("09:00", "18:00", [])


def test_window_opens_at_inside_returns_now() -> None:
    now = ny(2026, 6, 1, 14, 15, 30).replace(microsecond=123)  # Monday
    assert window_opens_at(now, office_hours(), NY) == ny(2026, 6, 1, 14, 15, 30)


@pytest.mark.parametrize("clock", [(9, 0, 0), (18, 0, 0)])
def test_window_opens_at_boundaries_count_as_inside(clock: tuple[int, int, int]) -> None:
    now = ny(2026, 6, 1, *clock)
    assert window_opens_at(now, office_hours(), NY) == now


def test_window_opens_at_before_opening_defers_to_today() -> None:
    assert window_opens_at(ny(2026, 6, 1, 7), office_hours(), NY) == ny(2026, 6, 1, 9)


def test_window_opens_at_after_closing_defers_to_next_day() -> None:
    assert window_opens_at(ny(2026, 6, 1, 18, 0, 1), office_hours(), NY) == ny(2026, 6, 2, 9)


def test_window_opens_at_skips_disallowed_weekdays() -> None:
    friday_evening = ny(2026, 6, 5, 19)
    assert window_opens_at(friday_evening, office_hours(), NY) == ny(2026, 6, 8, 9)
    saturday_noon = ny(2026, 6, 6, 12)
    assert window_opens_at(saturday_noon, office_hours(), NY) == ny(2026, 6, 8, 9)


def test_window_opens_at_judges_weekday_in_local_zone() -> None:
    now = utc(2026, 11, 23, 2)  # Monday in UTC, Sunday 21:00 in New York
    sunday_evening = Window.parse("20:00", "23:00", ["sun"])
    assert window_opens_at(now, sunday_evening, NY) == now
    assert window_opens_at(now, office_hours(), NY) == ny(2026, 11, 23, 9)


def test_window_across_midnight_counts_the_opening_day() -> None:
    saturday_1am = ny(2026, 6, 6, 1)
    friday_night = Window.parse("22:00", "02:00", ["fri"])
    assert window_opens_at(saturday_1am, friday_night, NY) == saturday_1am
    saturday_night = Window.parse("22:00", "02:00", ["sat"])
    assert window_opens_at(saturday_1am, saturday_night, NY) == ny(2026, 6, 6, 22)


def test_window_across_midnight_defers_to_evening() -> None:
    window = Window.parse("22:00", "02:00", None)
    assert window_opens_at(ny(2026, 6, 5, 3), window, NY) == ny(2026, 6, 5, 22)
    assert window_opens_at(ny(2026, 6, 5, 2), window, NY) == ny(2026, 6, 5, 2)
    assert window_opens_at(ny(2026, 6, 5, 22), window, NY) == ny(2026, 6, 5, 22)


def test_window_opening_in_dst_gap_moves_forward() -> None:
    window = Window.parse("02:30", "04:00", None)
    assert window_opens_at(ny(2026, 3, 8, 0), window, NY) == utc(2026, 3, 8, 7)  # 03:00 EDT
    london = Window.parse("01:30", "05:00", None)
    midnight = datetime(2026, 3, 29, 0, 0, tzinfo=LONDON).astimezone(UTC)
    assert window_opens_at(midnight, london, LONDON) == utc(2026, 3, 29, 1)  # 02:00 BST


def test_window_opens_at_result_is_utc() -> None:
    assert window_opens_at(ny(2026, 6, 1, 7), office_hours(), NY).tzinfo is UTC
