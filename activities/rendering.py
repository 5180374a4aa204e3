"""Template rendering: Jinja2 in an immutable sandbox, autoescaped HTML, forgiving of gaps.

A missing field renders empty (or the template's ``default(...)``), never ``None``,
and never raises: marketers' data is incomplete and a send must not crash on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import css_inline
from jinja2 import ChainableUndefined, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def _environment(autoescape: bool) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        autoescape=autoescape,
        undefined=ChainableUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )


_HTML = _environment(autoescape=True)
_PLAIN = _environment(autoescape=False)


class TemplateError(ValueError):
    """A template that cannot be compiled, with the part and line that is wrong."""


def check_template(part: str, source: str | None, *, html: bool = False) -> None:
    """Compile a template part at save time, so broken templates never reach a send."""
    if not source:
        return
    try:
        (_HTML if html else _PLAIN).parse(source)
    except TemplateSyntaxError as err:
        raise TemplateError(f"{part}: line {err.lineno}: {err.message}") from None


@dataclass
class RenderedEmail:
    subject: str
    html: str | None
    text: str | None


def render_context(
    contact: dict[str, Any], journey: dict[str, Any] | None, trigger: dict[str, Any] | None
) -> dict[str, Any]:
    """What templates see: the contact (attributes also at top level), journey and trigger."""
    attributes = contact.get("attributes") or {}
    merged = {**attributes, **{k: v for k, v in contact.items() if k != "attributes"}}
    merged["attributes"] = attributes
    return {"contact": merged, "journey": journey or {}, "trigger": trigger or {}}


def _render(source: str | None, context: dict[str, Any], *, html: bool) -> str | None:
    if source is None:
        return None
    env = _HTML if html else _PLAIN
    try:
        return env.from_string(source).render(context)
    except Exception as err:
        raise TemplateError(f"template failed to render: {err}") from None


def render_text(source: str, context: dict[str, Any]) -> str:
    """Plain text (SMS bodies, webhook bodies): no HTML escaping."""
    return _render(source, context, html=False) or ""


# Email clients drop <style> blocks (Gmail keeps only inline styles): rules are moved into
# style attributes; media queries stay in <style> for clients that honour them. Remote
# stylesheets are never fetched at send time.
_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)


def inline_css(html: str) -> str:
    if "<style" not in html.lower():
        return html
    try:
        return str(_INLINER.inline(html))
    except ValueError:
        return html  # CSS it cannot parse is sent as written rather than failing the send


def render_email(
    subject: str | None, html: str | None, text: str | None, context: dict[str, Any]
) -> RenderedEmail:
    rendered_html = _render(html, context, html=True)
    return RenderedEmail(
        subject=" ".join((_render(subject or "", context, html=False) or "").split()),
        html=inline_css(rendered_html) if rendered_html is not None else None,
        text=_render(text, context, html=False),
    )
