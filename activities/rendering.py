"""Template rendering: Jinja2 in an immutable sandbox, autoescaped HTML, forgiving of gaps.

A missing field renders empty (or the template's ``default(...)``), never ``None``,
and never raises: marketers' data is incomplete and a send must not crash on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import css_inline
from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError


def _finalize(value: Any) -> Any:
    return "" if value is None else value


# Templates are written by API users: the sandbox refuses attribute access to internals
# (``__class__``, ``__globals__``, ``_`` names) and mutation; these bound what a template
# can make the renderer allocate (a power or a repeated string of gigabytes, computed even
# at save time when Jinja folds constants).
MAX_SEQUENCE = 100_000
MAX_POWER_BITS = 4096
MAX_WIDTH = 1_000


def _check_size(operator: str, left: Any, right: Any) -> None:
    if operator == "**" and isinstance(left, int | float) and isinstance(right, int | float):
        bits = max(abs(int(left)), 2).bit_length()
        if right > 0 and bits * right > MAX_POWER_BITS:
            raise SecurityError(f"{left} ** {right} is too large for a template")
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and len(seq) * times > MAX_SEQUENCE:
                raise SecurityError(f"repeating a sequence to over {MAX_SEQUENCE} items")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_size(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _capped(name: str, filter_: Any) -> Any:
    def capped(value: Any, width: Any = 80, *args: Any, **kwargs: Any) -> Any:
        if isinstance(width, int) and width > MAX_WIDTH:
            raise SecurityError(f"{name} width {width} is over {MAX_WIDTH}")
        return filter_(value, width, *args, **kwargs)

    return capped


def _environment(autoescape: bool) -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        autoescape=autoescape,
        undefined=ChainableUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    # The filters whose width argument is allocated (truncate and wordwrap only shorten).
    for name in ("center", "indent"):
        env.filters[name] = _capped(name, env.filters[name])
    return env


_HTML = _environment(autoescape=True)
_PLAIN = _environment(autoescape=False)


class TemplateError(ValueError):
    """A template that cannot be compiled, with the part and line that is wrong."""


def check_template(part: str, source: str | None, *, html: bool = False) -> None:
    """Compile a template part at save time, so broken templates never reach a send."""
    if not source:
        return
    try:
        tree = (_HTML if html else _PLAIN).parse(source)
    except TemplateSyntaxError as err:
        raise TemplateError(f"{part}: line {err.lineno}: {err.message}") from None
    for name, lineno in _private_names(tree):
        # The sandbox would render these empty; refusing them at save says so at once.
        raise TemplateError(f"{part}: line {lineno}: {name!r} is private to the template engine")


def _private_names(tree: nodes.Template) -> list[tuple[str, int]]:
    """Attribute names starting with ``_`` (``x._y``, ``x|attr('_y')``) and dunder keys
    (``x['__class__']``; other keys are dictionary lookups, which the sandbox allows)."""
    found = [(n.attr, n.lineno) for n in tree.find_all(nodes.Getattr) if n.attr.startswith("_")]
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.arg, nodes.Const) and str(item.arg.value).startswith("__"):
            found.append((str(item.arg.value), item.lineno))
    for filter_ in tree.find_all(nodes.Filter):
        name = filter_.args[0] if filter_.name == "attr" and filter_.args else None
        if isinstance(name, nodes.Const) and str(name.value).startswith("_"):
            found.append((str(name.value), filter_.lineno))
    return found


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


@functools.lru_cache(maxsize=512)
def _compiled(source: str, html: bool) -> Template:
    """A template's source compiled once per process (a journey sends the same few
    templates to every contact; compiling is most of a render's cost)."""
    return (_HTML if html else _PLAIN).from_string(source)


def _render(source: str | None, context: dict[str, Any], *, html: bool) -> str | None:
    if source is None:
        return None
    try:
        return _compiled(source, html).render(context)
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
