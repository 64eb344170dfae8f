"""The parameters routes share, each with the pattern the OpenAPI schema documents and the check that enforces it,
both made from one regular expression: a client (or a fuzzer) that follows the schema is never refused for its
shape, and one that does not is refused with 422.

A route names a product with :data:`ProductName` (path, query or JSON body): the one name rule of
winclip_edge/names.py, refused with its one message (``error`` ``bad_name``). A result id is :data:`ResultId`,
checked by the route itself with :func:`~winclip_edge.service.store.valid_id` (``error`` ``bad_id``), the
store's own check before any path is built.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam
from pydantic import AfterValidator, Field

from ..names import MAX_NAME, NAME_PATTERN, check_name
from .store import ID_PATTERN

NAME_SCHEMA_PATTERN = f"^{NAME_PATTERN.pattern}$"  # JSON Schema patterns search; anchored = fullmatch
ID_SCHEMA_PATTERN = f"^{ID_PATTERN.pattern}$"
EXAMPLE_ID = "3f2a9c1e8b7d4e0fa1b2c3d4e5f60718"


def _product_name(value: str) -> str:
    return check_name(value, "product")  # InvalidName is a ValueError: pydantic reports it as a 422


ProductName = Annotated[str, AfterValidator(_product_name),
                        Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN, "maxLength": MAX_NAME, "minLength": 1},
                              examples=["widget"])]
ResultId = Annotated[str, Field(json_schema_extra={"pattern": ID_SCHEMA_PATTERN, "minLength": 32, "maxLength": 32},
                                examples=[EXAMPLE_ID])]

# The path parameters of every route that names a result or a product (app.py, review_api.py).
Rid = Annotated[ResultId, PathParam(description="the result's id (32 lower-case hex digits)")]
ProductPath = Annotated[ProductName, PathParam(description="a product this station serves")]

__all__ = ["EXAMPLE_ID", "ID_SCHEMA_PATTERN", "NAME_SCHEMA_PATTERN", "ProductName", "ProductPath", "ResultId", "Rid"]
