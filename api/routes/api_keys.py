"""API keys (admin scope): create (the key is answered once), list, revoke."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import col, select

from api.deps import SessionDep
from api.keys import Scope, create_api_key, normalise_scopes, revoke_api_key
from models.tables import ApiKey

router = APIRouter(prefix="/api-keys", tags=["api keys"])


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="What the key is for.")
    scopes: list[Scope] = Field(
        min_length=1,
        description="read (GET routes), write (everything that changes data, and the Segment "
        "tracking API), admin (everything, including key management and the codec server).",
    )

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[Scope]) -> list[Scope]:
        return normalise_scopes(value)


class ApiKeyPublic(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it.")
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The key itself. Shown this once; only its hash is stored.")


class ApiKeyList(BaseModel):
    keys: list[ApiKeyPublic]


KeyId = Annotated[uuid.UUID, Path(description="The key's id.")]


@router.post("", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED)
async def create_key(body: ApiKeyIn, session: SessionDep) -> ApiKeyCreated:
    """Create a key; the answer is the only time the key is shown."""
    row, raw = await create_api_key(session, body.name, body.scopes)
    return ApiKeyCreated(
        **ApiKeyPublic.model_validate(row, from_attributes=True).model_dump(), key=raw
    )


@router.get("", response_model=ApiKeyList)
async def list_keys(session: SessionDep) -> ApiKeyList:
    """Every key, revoked ones included (never the keys themselves)."""
    rows = (await session.exec(select(ApiKey).order_by(col(ApiKey.created_at)))).all()
    return ApiKeyList(keys=[ApiKeyPublic.model_validate(r, from_attributes=True) for r in rows])


@router.get("/{key_id}", response_model=ApiKeyPublic)
async def get_key(key_id: KeyId, session: SessionDep) -> ApiKeyPublic:
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key {key_id}")
    return ApiKeyPublic.model_validate(row, from_attributes=True)


@router.post("/{key_id}/revoke", response_model=ApiKeyPublic)
async def revoke_key(key_id: KeyId, session: SessionDep) -> ApiKeyPublic:
    """Revoke a key: every API process refuses it from the next request on."""
    row = await revoke_api_key(session, key_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key {key_id}")
    return ApiKeyPublic.model_validate(row, from_attributes=True)


@router.delete("/{key_id}", response_model=ApiKeyPublic)
async def delete_key(key_id: KeyId, session: SessionDep) -> ApiKeyPublic:
    """The same as revoke (the row stays, for the record)."""
    return await revoke_key(key_id, session)
