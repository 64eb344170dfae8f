"""The one error body of the HTTP face: every 4xx/5xx the service answers is ``{"error": kind, "detail": text}``.

Endpoints answer errors through :func:`error` and declare the statuses they can answer with :func:`responses`, so
the OpenAPI schema documents each status with this one body model (docs/service.md lists the kinds).
"""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

DESCRIPTIONS = {400: "Bad request", 401: "Missing or wrong bearer token", 404: "Not found", 409: "Conflict",
                413: "Upload too large", 422: "Invalid parameters or body", 500: "Inspection failed",
                503: "Not ready or busy", 504: "No result in time", 507: "The result could not be stored"}


class ErrorBody(BaseModel):
    """What went wrong: ``error`` a stable machine-readable kind, ``detail`` one line for a person."""

    error: str
    detail: str


def error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def responses(*statuses: int) -> dict:
    """The ``responses=`` of a route answering these error statuses, each with the one error body."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS.get(status, "Error")} for status in statuses}


__all__ = ["ErrorBody", "error", "responses"]
