"""Request bodies are checked before any route reads them (an ASGI middleware).

- Larger than ``max_body_bytes``: 413, whether announced by Content-Length or streamed
  (contact imports stream up to ``import_max_bytes`` and are left to their own limit).
- JSON bodies (``application/json``, ``*+json``, and ``text/plain``, which analytics.js
  uses for Segment calls) must be UTF-8 and nest arrays and objects no deeper than
  ``max_json_depth``: else 400. Deep nesting would otherwise reach Python's recursion limit
  in the parser, the validators or the condition evaluators.

Unknown fields are refused by the request models themselves (``extra="forbid"``), except
where arbitrary properties belong: Segment calls, provider webhooks, event properties and
contact attributes.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import yaml
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings

# Routes with their own, larger, streamed limit.
STREAMED_PATHS = ("/v1/contacts/import",)
# Linear on any input: possessive, and an unterminated string runs to the end.
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
MAX_DIGITS = 1000
# Outside strings, runs of digits too long to be a sensible number (Python's parser refuses
# over 4300 with an unhelpful error). NaN and Infinity are left to the routes and to the
# handler of values PostgreSQL refuses (api/main.py), which name them.
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (MAX_DIGITS + 1))
_STEP = {b"[": 1, b"{": 1, b"]": -1, b"}": -1}


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException so FastAPI's body parsing passes it on as
    the 413 it is (it turns other errors while reading into a 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest (strings skipped; the body need not be valid).
    Linear, and in C loops: about 10 ms per MB whatever the input."""
    brackets = _BRACKETS.findall(_STRINGS.sub(b'""', body))
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def long_number(body: bytes) -> int | None:
    """The digit count of the first number over MAX_DIGITS long, outside strings."""
    match = _LONG_NUMBER.search(_STRINGS.sub(b'""', body))
    return len(match.group()) if match else None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    # No Content-Type: FastAPI parses the body as JSON.
    return media in ("", "application/json", "text/plain") or media.endswith("+json")


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class InputGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STREAMED_PATHS):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_large = f"the request body is over {limit} bytes (NURTURE_MAX_BODY_BYTES)"
        try:
            announced = int(headers.get("content-length", "0"))
        except ValueError:
            await _respond(send, 400, "Content-Length is not a number")
            return
        if announced > limit:
            await _respond(send, 413, too_large)
            return
        if _is_json(headers.get("content-type", "")) and scope["method"] in (
            "POST",
            "PUT",
            "PATCH",
        ):
            await self._json(scope, receive, send, limit, too_large)
            return

        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await _respond(send, 413, too_large)

    async def _json(
        self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: str
    ) -> None:
        """Read the whole (bounded) body, check it, then hand it to the app."""
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _respond(send, 413, too_large)
                return
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            await _respond(
                send, 400, f"the JSON body is not valid UTF-8 (byte {err.start}): send UTF-8"
            )
            return
        depth = json_depth(bytes(body))
        if depth > self.settings.max_json_depth:
            await _respond(
                send,
                400,
                f"the JSON body nests {depth} levels deep; at most "
                f"{self.settings.max_json_depth} are allowed (NURTURE_MAX_JSON_DEPTH)",
            )
            return
        digits = long_number(bytes(body))
        if digits is not None:
            await _respond(
                send,
                400,
                f"the JSON body holds a number of {digits} digits; at most {MAX_DIGITS} are "
                "allowed",
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class YamlRefused(ValueError):
    pass


def load_yaml(text: str, max_depth: int) -> Any:
    """``yaml.safe_load`` without aliases (``*ref`` can expand a small document into
    billions of nodes) and no deeper than ``max_depth`` (PyYAML recurses per level)."""

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise YamlRefused(
                    f"YAML aliases (*{event.anchor}) are not accepted "
                    f"(line {event.start_mark.line + 1}); repeat the content instead"
                )
            self.depth += 1
            if self.depth > max_depth:
                raise YamlRefused(f"the YAML nests deeper than {max_depth} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return yaml.load(text, Loader=Loader)
