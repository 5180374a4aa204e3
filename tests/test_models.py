"""The journey document's building blocks: durations, conditions, template rendering."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from activities.rendering import TemplateError, check_template, render_context, render_email
from models.conditions import Condition, evaluate
from models.durations import format_duration, parse_duration

CONDITION: TypeAdapter[Any] = TypeAdapter(Condition)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("3d", timedelta(days=3)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2w", timedelta(weeks=2)),
        (" 45 s ", timedelta(seconds=45)),
    ],
)
def test_duration_parses(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "3", "3x", "-1d", "0m", "PT15M", "d3"])
def test_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_duration_reads_in_plain_words() -> None:
    assert format_duration(timedelta(weeks=3)) == "3 weeks"
    assert format_duration(timedelta(days=1, hours=2, minutes=1)) == "1 day 2 hours 1 minute"
    assert format_duration(timedelta(seconds=10)) == "10 seconds"


CONTACT = {
    "email": "ada@example.com",
    "score": 40,
    "tags": ["trial", "webinar"],
    "attributes": {"role": "CMO", "seats": 12, "plan": None, "teams": ["growth", "brand"]},
}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"attr": "role", "op": "eq", "value": "CMO"}, True),
        ({"attr": "role", "value": "CMO"}, True),
        ({"attr": "role", "op": "in", "value": ["CMO", "VP Marketing"]}, True),
        ({"attr": "role", "op": "not_in", "value": ["CMO"]}, False),
        ({"attr": "seats", "op": "gt", "value": 10}, True),
        ({"attr": "seats", "op": "lte", "value": 11}, False),
        ({"attr": "seats", "op": "gt", "value": "ten"}, False),
        ({"attr": "email", "op": "starts_with", "value": "ada@"}, True),
        ({"attr": "email", "op": "contains", "value": "example"}, True),
        ({"attr": "tags", "op": "eq", "value": "webinar"}, True),
        ({"attr": "teams", "op": "starts_with", "value": "gro"}, True),
        ({"attr": "company", "op": "exists"}, False),
        ({"attr": "company", "op": "not_exists"}, True),
        ({"attr": "company", "op": "ne", "value": "Acme"}, True),
        ({"attr": "company", "op": "not_in", "value": ["Acme"]}, True),
        ({"attr": "company", "op": "eq", "value": "Acme"}, False),
        ({"attr": "company", "op": "lt", "value": 3}, False),
        ({"attr": "plan", "op": "not_exists"}, True),
        ({"score_gte": 40}, True),
        ({"score_gte": 41}, False),
        ({"all": [{"attr": "role", "value": "CMO"}, {"score_gte": 50}]}, False),
        ({"any": [{"attr": "role", "value": "CTO"}, {"score_gte": 10}]}, True),
        ({"not": {"attr": "role", "value": "CMO"}}, False),
    ],
)
def test_condition_on_a_contact(condition: dict[str, Any], expected: bool) -> None:
    assert evaluate(CONDITION.validate_python(condition), CONTACT) is expected


def test_condition_on_event_properties() -> None:
    where = CONDITION.validate_python({"prop": "page", "op": "eq", "value": "/pricing"})
    assert evaluate(where, {}, {"properties": {"page": "/pricing"}})
    assert not evaluate(where, {}, {"properties": {"page": "/blog"}})
    assert not evaluate(where, {}, None)


@pytest.mark.parametrize(
    ("condition", "problem"),
    [
        ({"colour": "red"}, "a condition needs one of"),
        ({"attr": "x", "op": "between", "value": 1}, "Input should be"),
        ({"attr": "x", "op": "in", "value": "CMO"}, "needs a list value"),
        ({"attr": "x", "op": "eq"}, "needs a value"),
        ({"all": []}, "at least 1 item"),
        ({"attr": "x", "value": 1, "extra": 2}, "Extra inputs"),
    ],
)
def test_condition_refuses_bad_shapes(condition: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        CONDITION.validate_python(condition)


def test_missing_fields_render_as_fallbacks_never_none() -> None:
    context = render_context(
        {"email": "ada@example.com", "attributes": {"last_name": None}}, None, None
    )
    rendered = render_email(
        "Hi {{ contact.first_name | default('there') }}{{ contact.last_name }}",
        "<p>{{ contact.company.name }}|{{ trigger.properties.plan }}|{{ contact.email }}</p>",
        "{{ contact.attributes.nothing }}",
        context,
    )
    assert rendered.subject == "Hi there"
    assert rendered.html == "<p>||ada@example.com</p>"
    assert rendered.text == ""
    assert "None" not in (rendered.subject + (rendered.html or ""))


def test_html_is_autoescaped_and_sandboxed() -> None:
    context = render_context({"attributes": {"first_name": "<script>x</script>"}}, None, None)
    rendered = render_email(
        "{{ contact.first_name }}", "<b>{{ contact.first_name }}</b>", None, context
    )
    assert rendered.html == "<b>&lt;script&gt;x&lt;/script&gt;</b>"
    assert rendered.subject == "<script>x</script>"  # a subject is plain text, not HTML
    # Unsafe attributes read as undefined (empty), and mutation is refused.
    assert render_email("{{ ''.__class__.__mro__ }}", None, None, context).subject == ""
    with pytest.raises(TemplateError, match="failed to render"):
        render_email("{% set x = contact.update({'a': 1}) %}", None, None, context)


def test_template_syntax_errors_name_part_and_line() -> None:
    with pytest.raises(TemplateError, match="html: line 2"):
        check_template("html", "<p>ok</p>\n{% if %}", html=True)


def test_email_css_is_inlined_and_media_queries_kept() -> None:
    html = (
        "<html><head><style>p.lead { color: #d33; } "
        "@media (max-width: 600px) { p.lead { font-size: 18px; } }</style></head>"
        "<body><p class='lead'>Hi {{ contact.first_name }}</p></body></html>"
    )
    rendered = render_email(
        "s", html, None, render_context({"attributes": {"first_name": "Ada"}}, None, None)
    )
    assert rendered.html is not None
    assert '<p class="lead" style="color: #d33;">Hi Ada</p>' in rendered.html
    assert "@media (max-width: 600px)" in rendered.html
    plain = render_email("s", "<p>No styles</p>", None, render_context({}, None, None))
    assert plain.html == "<p>No styles</p>"
