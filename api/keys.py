"""API keys: scoped, stored hashed, revocable; and the command line that creates them.

A key is ``nk_`` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256
is stored: the key is shown once, when it is made. A fast hash is enough because the key
is 256 bits of randomness, not a password someone chose: nothing guesses a preimage, so
a slow password hash (bcrypt, argon2) would only cost every request time for no gain.
The first 12 characters (``prefix``) find the row and tell keys apart in listings.

Every request looks its key up in PostgreSQL (no cache), so a revoked key fails at once
in every API process.

The key in ``NURTURE_API_KEY`` (the bootstrap key) is an admin key compared in constant
time; it is not stored, so it cannot be revoked through the API: change the setting.

    python -m api.keys create --name crm-sync --scope write [--scope read]
    python -m api.keys list
    python -m api.keys revoke <id>
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from models.db import session_scope
from models.tables import ApiKey, utcnow
from settings import Settings, get_settings

KEY_PREFIX = "nk_"
PREFIX_LENGTH = 12
# last_used_at is written at most this often per key: a write per request is wasted I/O.
LAST_USED_PRECISION = timedelta(minutes=1)


class Scope(StrEnum):
    """What a key may do. Scopes are independent (a ``write`` key, e.g. a Segment write key
    in a web page, cannot read contacts), except that ``admin`` may do everything."""

    read = "read"
    write = "write"
    admin = "admin"


@dataclass(frozen=True)
class ApiKeyPrincipal:
    """Who a request acts as: a stored key (``id``) or the bootstrap key (``id`` None)."""

    id: uuid.UUID | None
    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return Scope.admin in self.scopes or scope in self.scopes


BOOTSTRAP = ApiKeyPrincipal(id=None, name="NURTURE_API_KEY", scopes=frozenset({Scope.admin}))


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def normalise_scopes(scopes: Iterable[str]) -> list[Scope]:
    """Known scopes, deduplicated and in a stable order; ValueError naming an unknown one."""
    wanted = set()
    for scope in scopes:
        try:
            wanted.add(Scope(scope))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {scope!r} (known: {known})") from None
    if not wanted:
        raise ValueError("a key needs at least one scope")
    return [s for s in Scope if s in wanted]


async def create_api_key(
    session: AsyncSession, name: str, scopes: Iterable[str]
) -> tuple[ApiKey, str]:
    """Store a new key; returns the row and the key itself (shown once, never stored)."""
    raw = new_raw_key()
    row = ApiKey(
        name=name,
        prefix=raw[:PREFIX_LENGTH],
        key_hash=hash_key(raw),
        scopes=[s.value for s in normalise_scopes(scopes)],
    )
    session.add(row)
    await session.flush()
    return row, raw


async def revoke_api_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    """Revoke a key (again is harmless: the first revocation time is kept)."""
    row = await session.get(ApiKey, key_id, with_for_update=True)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        await session.flush()
    return row


async def authenticate_key(
    session: AsyncSession, settings: Settings, raw_key: str
) -> ApiKeyPrincipal | None:
    """The principal a presented key stands for, or None if it is unknown or revoked.

    The bootstrap key (``settings.api_key``) is checked first in constant time and needs
    no database. Stored keys are found by prefix and compared by hash in constant time;
    their ``last_used_at`` is refreshed at most once a minute, in a short transaction of
    its own.
    """
    if not raw_key:
        return None
    if settings.api_key and secrets.compare_digest(raw_key.encode(), settings.api_key.encode()):
        return BOOTSTRAP
    if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > 200:
        return None
    digest = hash_key(raw_key)
    rows = (
        await session.exec(
            select(ApiKey).where(
                col(ApiKey.prefix) == raw_key[:PREFIX_LENGTH], col(ApiKey.revoked_at).is_(None)
            )
        )
    ).all()
    found = next((r for r in rows if secrets.compare_digest(r.key_hash, digest)), None)
    if found is None:
        return None
    if found.last_used_at is None or utcnow() - found.last_used_at > LAST_USED_PRECISION:
        await _touch(settings, found.id)
    return ApiKeyPrincipal(
        id=found.id, name=found.name, scopes=frozenset(Scope(s) for s in found.scopes)
    )


# In its own short transaction, skipping a row another request is touching: requests with
# the same key never wait on each other (or on a long request's open transaction).
_TOUCH = text(
    "UPDATE api_keys SET last_used_at = now() WHERE id = ("
    "  SELECT id FROM api_keys WHERE id = :id"
    "  AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => :secs))"
    "  FOR UPDATE SKIP LOCKED)"
)


async def _touch(settings: Settings, key_id: uuid.UUID) -> None:
    async with session_scope(settings.database_url) as session:
        await (await session.connection()).execute(
            _TOUCH, {"id": key_id, "secs": LAST_USED_PRECISION.total_seconds()}
        )


async def _cli(args: argparse.Namespace, settings: Settings) -> int:
    async with session_scope(settings.database_url) as session:
        if args.command == "create":
            try:
                row, raw = await create_api_key(session, args.name, args.scope)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"created key {row.id} ({row.name}, scopes: {', '.join(row.scopes)})")
            print("the key (shown once, store it now):", file=sys.stderr)
            print(raw)
        elif args.command == "list":
            for row in (await session.exec(select(ApiKey).order_by(col(ApiKey.created_at)))).all():
                state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
                scopes = ",".join(row.scopes)
                print(f"{row.id}  {row.prefix}…  {scopes:<16} {state:<24} {row.name}")
        else:
            revoked = await revoke_api_key(session, args.id)
            if revoked is None:
                print(f"error: no key {args.id}", file=sys.stderr)
                return 1
            print(f"revoked key {revoked.id} ({revoked.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=[s.value for s in Scope],
        help="a scope the key grants (repeat for several)",
    )
    commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("id", type=uuid.UUID)
    args = parser.parse_args(argv)
    settings = get_settings()
    if not settings.database_url:
        parser.error("set NURTURE_DATABASE_URL")
    return asyncio.run(_cli(args, settings))


if __name__ == "__main__":
    raise SystemExit(main())
