"""Bulk contact import: the body is streamed, parsed and validated row by row, and the valid
rows are loaded set-based (COPY into a temporary table, then one UPDATE and one INSERT).

Rules a caller relies on:
- Rows are numbered from 1 in the order they come (CSV: the header is not a row; blank
  lines are skipped); ``errors`` name rows by that number.
- A row is identified by email or external_id, like ``POST /v1/contacts``: it updates the
  contact one of them names, or creates a contact. Given values replace stored ones,
  attributes are merged (JSON ``null`` deletes a key), values not given are kept.
- A row whose email or external_id already came in an earlier row of the same import is
  rejected (no silent "last row wins": the file is ambiguous, and the caller is told where).
  So is a row that names the same stored contact as an earlier row, and one whose email and
  external_id belong to two different stored contacts.
- The whole import is one transaction: a body over ``import_max_bytes`` or with more than
  ``import_max_rows`` rows (413), or one whose structure is broken (400), stores nothing.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request, status
from psycopg import AsyncConnection, AsyncCopy
from psycopg.types.json import Jsonb
from sqlmodel.ext.asyncio.session import AsyncSession

from api.schemas import ImportResult, ImportRowError, normalise_email, normalise_phone
from models.journey import check_timezone
from settings import Settings

MAX_ERRORS = 1000
CSV_TYPES = {"text/csv", "application/csv"}
JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}
FIELDS = ("email", "external_id", "phone", "timezone", "lifecycle_stage", "tags", "attributes")
# JSON parse errors this close to the end of the buffer may just be a row cut by a chunk.
_INCOMPLETE_TAIL = 16


class Malformed(Exception):
    """The body's structure is broken (not one row's content): nothing is stored."""


@dataclass
class _Rows:
    """Validates rows as they come and counts what was received and rejected."""

    max_rows: int
    received: int = 0
    rejected: int = 0
    errors: list[ImportRowError] = field(default_factory=list)
    emails: dict[str, int] = field(default_factory=dict)
    external_ids: dict[str, int] = field(default_factory=dict)

    def reject(self, row: int, error: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(ImportRowError(row=row, error=error))

    def count(self) -> int:
        self.received += 1
        if self.received > self.max_rows:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"import has more than {self.max_rows} rows (import_max_rows); "
                "split it into several imports",
            )
        return self.received

    def check(self, row: int, given: dict[str, Any]) -> tuple[Any, ...] | None:
        """The row as a tuple for COPY, or None after recording why it is rejected."""
        try:
            values = _clean(given)
        except ValueError as err:
            self.reject(row, str(err))
            return None
        email, external_id = values[0], values[1]
        for name, value, seen in (
            ("email", email, self.emails),
            ("external_id", external_id, self.external_ids),
        ):
            if value is not None and value in seen:
                self.reject(row, f"duplicate {name} {value} (first in row {seen[value]})")
                return None
        if email is not None:
            self.emails[email] = row
        if external_id is not None:
            self.external_ids[external_id] = row
        return (row, *values)


def _text(name: str, value: Any, max_length: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if len(value) > max_length:
        raise ValueError(f"{name} is longer than {max_length} characters")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")
    return value


def _clean(given: dict[str, Any]) -> tuple[Any, ...]:
    """Validate and normalise one row's fields (None: not given)."""
    email = given.get("email")
    if email is not None:
        email = normalise_email(_text("email", email, 320))
    external_id = given.get("external_id")
    if external_id is not None:
        external_id = _text("external_id", external_id, 200)
        if not external_id:
            raise ValueError("external_id is empty")
    if email is None and external_id is None:
        raise ValueError("a contact needs an email or an external_id")
    phone = given.get("phone")
    if phone is not None:
        phone = normalise_phone(_text("phone", phone, 64))
    zone = check_timezone(given.get("timezone"))
    stage = given.get("lifecycle_stage")
    if stage is not None and not _text("lifecycle_stage", stage, 32):
        raise ValueError("lifecycle_stage is empty")
    tags = given.get("tags")
    if tags is not None and not (
        isinstance(tags, list) and all(isinstance(t, str) and "\x00" not in t for t in tags)
    ):
        raise ValueError("tags must be a list of strings")
    attributes = given.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be an object")
    drop = [name for name, value in attributes.items() if value is None]
    keep = {name: value for name, value in attributes.items() if value is not None}
    if "\\u0000" in json.dumps(keep):
        raise ValueError("attributes contain a NUL character")
    return (email, external_id, phone, zone, stage, tags, Jsonb(keep), drop)


def _from_json(item: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field {unknown[0]!r} (custom fields go in attributes; "
            f"known: {', '.join(FIELDS)})"
        )
    return item


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body, refused with 413 as soon as it is larger than ``max_bytes``."""
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"import body is larger than {max_bytes} bytes (import_max_bytes); "
        "split it into several imports",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise too_large
        yield chunk


async def _decoded(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset = 0
    try:
        async for chunk in chunks:
            yield decoder.decode(chunk)
            offset += len(chunk)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise Malformed(f"the body is not UTF-8 (byte {offset + err.start + 1})") from None


def _complete_records(text: str) -> int:
    """Length of the prefix of ``text`` that ends with a whole CSV record (quotes balanced)."""
    end = pos = 0
    odd = False
    for part in text.split("\n")[:-1]:
        pos += len(part) + 1
        odd ^= part.count('"') % 2 == 1
        if not odd:
            end = pos
    return end


async def _csv_rows(texts: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The fields of each CSV record; known columns by name, any other is an attribute."""
    header: list[str] | None = None
    line = 0
    pending = ""
    eof = False
    iterator = texts.__aiter__()
    while not eof:
        try:
            pending += await anext(iterator)
            cut = _complete_records(pending)
        except StopAsyncIteration:
            eof, cut = True, len(pending)
        if not cut:
            continue
        block, pending = pending[:cut], pending[cut:]
        reader = csv.reader(io.StringIO(block, newline=""), strict=True)
        start = line
        try:
            for record in reader:
                first_line, line = line + 1, start + reader.line_num
                if not record or record == [""]:
                    continue
                if header is None:
                    header = _header(record)
                    continue
                if len(record) != len(header):
                    raise Malformed(
                        f"line {first_line}: {len(record)} fields, the header has {len(header)}"
                    )
                yield _csv_fields(header, record)
        except csv.Error as err:
            raise Malformed(f"line {start + reader.line_num}: {err}") from None
    if header is None:
        raise Malformed("the CSV has no header row")


def _header(record: list[str]) -> list[str]:
    names = [name.strip() for name in record]
    for number, name in enumerate(names, 1):
        if not name:
            raise Malformed(f"line 1: column {number} of the header has no name")
    known = [n.lower() if n.lower() in FIELDS else n for n in names]
    for name in known:
        if known.count(name) > 1:
            raise Malformed(f"line 1: column {name!r} appears twice in the header")
    if "attributes" in known:
        raise Malformed("line 1: 'attributes' is not a CSV column: every other column is one")
    if "email" not in known and "external_id" not in known:
        raise Malformed("line 1: the header needs an email or an external_id column")
    return known


def _csv_fields(header: list[str], record: list[str]) -> dict[str, Any]:
    given: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    for name, cell in zip(header, record, strict=True):
        if cell == "":
            continue
        if name == "tags":
            given["tags"] = [tag.strip() for tag in cell.split(";") if tag.strip()]
        elif name in FIELDS:
            given[name] = cell.strip()
        else:
            attributes[name] = cell
    given["attributes"] = attributes
    return given


async def _ndjson_rows(texts: AsyncIterator[str]) -> AsyncIterator[Any]:
    line = 0
    pending = ""
    async for text in texts:
        pending += text
        lines = pending.split("\n")
        pending = lines.pop()
        for raw in lines:
            line += 1
            if raw.strip():
                yield _json_line(line, raw)
    if pending.strip():
        yield _json_line(line + 1, pending)


def _json_line(line: int, raw: str) -> Any:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as err:
        raise Malformed(f"line {line}: {err.msg} (column {err.colno})") from None
    if not isinstance(item, dict):
        raise Malformed(f"line {line}: not a JSON object")
    return item


class _JsonArray:
    """Reads a JSON array of objects element by element from a stream of text."""

    def __init__(self, texts: AsyncIterator[str]) -> None:
        self.texts = texts.__aiter__()
        self.buffer = ""
        self.pos = 0
        self.lines_before = 0  # newlines in the text already dropped from the buffer
        self.eof = False
        self.decoder = json.JSONDecoder()

    async def _fill(self) -> None:
        self.lines_before += self.buffer.count("\n", 0, self.pos)
        self.buffer = self.buffer[self.pos :]
        self.pos = 0
        try:
            self.buffer += await anext(self.texts)
        except StopAsyncIteration:
            self.eof = True

    async def _peek(self) -> str:
        """The next non-blank character ('' at the end of the body)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if self.eof:
                return ""
            await self._fill()

    def _line(self, pos: int) -> int:
        return self.lines_before + self.buffer.count("\n", 0, pos) + 1

    def _broken(self, what: str) -> Malformed:
        return Malformed(f"line {self._line(self.pos)}: {what}")

    async def rows(self) -> AsyncIterator[Any]:
        if await self._peek() != "[":
            raise self._broken("a JSON import is an array of objects: expected '['")
        self.pos += 1
        number = 0
        while True:
            char = await self._peek()
            if char == "]" and number == 0:
                self.pos += 1
                break
            if number:
                if char == "]":
                    self.pos += 1
                    break
                if char != ",":
                    raise self._broken(f"expected ',' or ']' after element {number}")
                self.pos += 1
                char = await self._peek()
            if char != "{":
                raise self._broken(f"element {number + 1} is not an object")
            number += 1
            yield await self._element(number)
        if await self._peek() != "":
            raise self._broken("unexpected text after the array")

    async def _element(self, number: int) -> Any:
        while True:
            try:
                item, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                cut = err.msg.startswith("Unterminated") or (
                    len(self.buffer) - err.pos < _INCOMPLETE_TAIL
                )
                if self.eof or not cut:
                    raise Malformed(
                        f"line {self._line(err.pos)}: element {number}: {err.msg}"
                    ) from None
                # Grow the buffer geometrically so a huge element is not re-parsed per chunk.
                wanted = 2 * (len(self.buffer) - self.pos)
                await self._fill()
                while not self.eof and len(self.buffer) < wanted:
                    await self._fill()
                continue
            self.pos = end
            return item


def _content_kind(request: Request) -> str:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in CSV_TYPES:
        return "csv"
    if content_type in JSON_TYPES:
        return "json"
    if content_type in NDJSON_TYPES:
        return "ndjson"
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        f"unsupported content type {content_type or '(none)'!r}: send text/csv, "
        "application/json (an array of contacts) or application/x-ndjson (one per line)",
    )


async def _parsed(request: Request, settings: Settings) -> AsyncIterator[tuple[Any, str]]:
    """(fields, "") per row of the body, or (None, why) for a row refused as it stands."""
    kind = _content_kind(request)
    texts = _decoded(_limited(request, settings.import_max_bytes))
    if kind == "csv":
        async for fields in _csv_rows(texts):
            yield fields, ""
        return
    source = _JsonArray(texts).rows() if kind == "json" else _ndjson_rows(texts)
    async for item in source:
        try:
            yield _from_json(item), ""
        except ValueError as err:
            yield None, str(err)


STAGE = """
CREATE TEMP TABLE import_rows (
    row_no int PRIMARY KEY,
    email text, external_id text, phone text, timezone text, lifecycle_stage text,
    tags text[], attributes jsonb NOT NULL, drop_keys text[] NOT NULL,
    new_id uuid NOT NULL DEFAULT gen_random_uuid(),
    target uuid,
    error text
) ON COMMIT DROP
"""
# Imports creating at least this many contacts refresh the table statistics.
ANALYZE_AFTER = 1_000

COPY = (
    "COPY import_rows (row_no, email, external_id, phone, timezone, lifecycle_stage, tags, "
    "attributes, drop_keys) FROM STDIN"
)
RESOLVE = """
UPDATE import_rows r
SET target = coalesce(ce.id, cx.id),
    error = CASE WHEN ce.id <> cx.id THEN format(
        'email %s belongs to contact %s and external_id %s to contact %s',
        s.email, ce.id, s.external_id, cx.id) END
FROM import_rows s
LEFT JOIN contacts ce ON ce.email = s.email
LEFT JOIN contacts cx ON cx.external_id = s.external_id
WHERE s.row_no = r.row_no AND (ce.id IS NOT NULL OR cx.id IS NOT NULL)
"""
SAME_TARGET = """
UPDATE import_rows r
SET error = format('names the same contact %s as row %s', f.target, f.first_row)
FROM (
    SELECT row_no, target, first_value(row_no) OVER (PARTITION BY target ORDER BY row_no)
        AS first_row
    FROM import_rows WHERE target IS NOT NULL AND error IS NULL
) f
WHERE f.row_no = r.row_no AND f.first_row <> r.row_no
"""
UPDATE = """
UPDATE contacts c SET
    email = coalesce(r.email, c.email),
    external_id = coalesce(r.external_id, c.external_id),
    phone = coalesce(r.phone, c.phone),
    timezone = coalesce(r.timezone, c.timezone),
    lifecycle_stage = coalesce(r.lifecycle_stage, c.lifecycle_stage),
    tags = coalesce(r.tags, c.tags),
    attributes = (c.attributes || r.attributes) - r.drop_keys,
    updated_at = now()
FROM import_rows r
WHERE r.error IS NULL AND r.target = c.id
"""
# ON CONFLICT: a contact another request created since RESOLVE makes the row rejected (the
# `raced` step, which PostgreSQL runs although nothing reads it), not the import fail.
INSERT = """
WITH inserted AS (
    INSERT INTO contacts (id, email, external_id, phone, timezone, lifecycle_stage, score,
        score_adjustment, tags, attributes, email_status, sms_status, created_at, updated_at)
    SELECT new_id, email, external_id, phone, timezone, coalesce(lifecycle_stage, 'subscriber'),
        0, 0, coalesce(tags, '{}'), attributes, 'subscribed', 'subscribed', now(), now()
    FROM import_rows WHERE error IS NULL AND target IS NULL
    ORDER BY row_no
    ON CONFLICT DO NOTHING
    RETURNING id
), raced AS (
    UPDATE import_rows r
    SET error = 'its email or external_id was just taken by another request; import it again'
    WHERE r.error IS NULL AND r.target IS NULL
        AND NOT EXISTS (SELECT 1 FROM inserted i WHERE i.id = r.new_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted)
"""
REJECTED = "SELECT row_no, error FROM import_rows WHERE error IS NOT NULL ORDER BY row_no LIMIT %s"
ENROLLED = """
SELECT DISTINCT e.contact_id FROM enrollments e
JOIN import_rows r ON r.target = e.contact_id AND r.error IS NULL
WHERE e.status = 'active'
"""


@dataclass
class ImportOutcome:
    result: ImportResult
    # Updated contacts with running journeys, to be told after the commit.
    enrolled: list[uuid.UUID]


async def import_contacts(
    session: AsyncSession, request: Request, settings: Settings
) -> ImportOutcome:
    """Load the body's contacts in the session's transaction; the caller commits."""
    kind = _content_kind(request)
    rows = _Rows(max_rows=settings.import_max_rows)
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    async with driver.cursor() as cursor:
        await cursor.execute(STAGE)
        try:
            async with cursor.copy(COPY) as copy:
                await _load(copy, _parsed(request, settings), rows)
        except Malformed as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed {kind}: {err}") from None
        await cursor.execute("ANALYZE import_rows")
        await cursor.execute(RESOLVE)
        await cursor.execute(SAME_TARGET)
        await cursor.execute(UPDATE)
        updated = cursor.rowcount
        await cursor.execute(INSERT)
        created = int((await cursor.fetchone() or (0,))[0])
        if created >= ANALYZE_AFTER:
            # Fresh statistics at once, not when autovacuum gets round to it: segment
            # refreshes that run next plan their joins on contacts from these numbers
            # (seen: a NOT EXISTS planned for 1 row over 100,000 new contacts ran minutes).
            # ANALYZE counts this transaction's own new rows.
            await cursor.execute("ANALYZE contacts")
        await cursor.execute("SELECT count(*) FROM import_rows WHERE error IS NOT NULL")
        stored_rejects = int((await cursor.fetchone() or (0,))[0])
        await cursor.execute(REJECTED, (MAX_ERRORS,))
        late = [ImportRowError(row=row, error=error) for row, error in await cursor.fetchall()]
        await cursor.execute(ENROLLED)
        enrolled = [contact_id for (contact_id,) in await cursor.fetchall()]
    errors = sorted([*rows.errors, *late], key=lambda e: e.row)[:MAX_ERRORS]
    return ImportOutcome(
        result=ImportResult(
            received=rows.received,
            created=created,
            updated=updated,
            rejected=rows.rejected + stored_rejects,
            errors=errors,
        ),
        enrolled=enrolled,
    )


async def _load(
    copy: AsyncCopy,
    parsed: AsyncIterator[tuple[Any, str]],
    rows: _Rows,
) -> None:
    async for given, error in parsed:
        row = rows.count()
        if given is None:
            rows.reject(row, error)
            continue
        values = rows.check(row, given)
        if values is not None:
            await copy.write_row(values)
