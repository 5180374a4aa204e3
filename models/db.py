"""Database engine and sessions (async SQLAlchemy over psycopg 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from settings import get_settings, to_sqlalchemy_url


@lru_cache
def get_engine(url: str | None = None) -> AsyncEngine:
    """One pooled engine per database URL and process."""
    target = to_sqlalchemy_url(url) if url else get_settings().sqlalchemy_url
    return create_async_engine(target, pool_size=10, max_overflow=10, pool_pre_ping=True)


@lru_cache
def _sessionmaker(url: str | None) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(get_engine(url), class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def session_scope(url: str | None = None) -> AsyncIterator[AsyncSession]:
    """A session that commits on success and rolls back on error."""
    async with _sessionmaker(url)() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
