"""Temporal for development and tests: Nurture's search attributes registered on a server."""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from models.contracts import SEARCH_ATTRIBUTES


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Add Nurture's search attributes (journey, version, contact, step, status)."""
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=namespace,
            search_attributes={
                key.name: IndexedValueType.ValueType(key.indexed_value_type.value)
                for key in SEARCH_ATTRIBUTES
            },
        )
    )


def cli_type(key: SearchAttributeKey[Any]) -> str:
    """The type name ``temporal ... --search-attribute NAME=TYPE`` takes."""
    return key.indexed_value_type.name.title().replace("_", "")
