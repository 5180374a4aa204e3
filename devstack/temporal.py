"""Temporal for development and tests: Nurture's search attributes registered on a server."""

from __future__ import annotations

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client

from models.contracts import SEARCH_ATTRIBUTES


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Add Nurture's keyword search attributes (journey, contact, step, status)."""
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES
            },
        )
    )
