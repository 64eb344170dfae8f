"""The one error body of the HTTP face, and a schema that documents every status the service answers.

Every 4xx/5xx the service answers is ``{"error": kind, "detail": text}`` (:class:`ErrorBody`): the routes' own
errors (:func:`error`), the request validation errors (FastAPI's own 422 body and schema are replaced), the
router's 404/405 and the body-parse 400, the token check's 401 and the body guard's 413. A route declares the
statuses it answers itself with ``responses=responses(404, 409)``; the statuses every route may answer come from
the app (:data:`COMMON`) and :func:`document` keeps, per operation, those that apply to it (401 only with a token
and not on the open paths, 422 only where there is something to validate, 400 where a JSON body is parsed, 413
where a body may be sent), so a router added later is documented the same way by construction. docs/service.md
lists the kinds.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..names import InvalidName

DESCRIPTIONS = {400: "The body cannot be parsed", 401: "Missing or wrong bearer token", 404: "Not found",
                409: "Conflict", 413: "Request body too large", 422: "Invalid parameters or body",
                500: "Inspection failed", 503: "Not ready or busy", 504: "No result in time",
                507: "The result could not be stored"}
COMMON = (400, 401, 413, 422)  # what any route may answer (document() keeps those that apply to a route)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ERROR_REF = "#/components/schemas/ErrorBody"
HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}  # router / parser errors


class ErrorBody(BaseModel):
    """What went wrong: ``error`` a stable machine-readable kind, ``detail`` one line for a person."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "unknown_product",
                                                               "detail": "unknown product 'bolt'; this station "
                                                                         "serves ['widget']"}]})
    error: str
    detail: str


def error(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


def responses(*statuses: int) -> dict:
    """The ``responses=`` of a route answering these error statuses, each with the one error body."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS.get(status, "Error")} for status in statuses}


def _validation_detail(exc: RequestValidationError) -> tuple[str, str]:
    """(kind, one line) of a validation error: ``bad_name`` when every problem is the name rule's."""
    errors = exc.errors()
    names = [isinstance((e.get("ctx") or {}).get("error"), InvalidName) for e in errors]
    parts = []
    for e in errors:
        message = str(e.get("msg", ""))
        message = message[len("Value error, "):] if message.startswith("Value error, ") else message
        parts.append(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {message}")
    return ("bad_name" if errors and all(names) else "bad_request"), "; ".join(parts)


def install_handlers(app: FastAPI, count: Callable[[str], None]) -> None:
    """Answer validation errors and the router's/parser's HTTP errors with the one body; ``count(kind)`` counts
    each (winclip_errors_total)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind, detail = _validation_detail(exc)
        count(kind)
        return error(422, kind, detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(exc.status_code, "http_error")
        count(kind)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:
            detail = f"{detail}: send JSON (UTF-8) as the schema at /openapi.json describes"
        if exc.status_code == 405:  # the router names the methods of the first route of that path only
            allowed = _methods_of(app, request.scope)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not a method of {request.url.path}; it takes {', '.join(allowed)}"
        return error(exc.status_code, kind, detail, headers=headers or None)


def _methods_of(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route of the request's path takes."""
    methods: set[str] = set()
    for route in app.routes:
        if getattr(route, "methods", None) and route.matches({**scope, "method": "GET"})[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def _applies(status: int, path: str, method: str, operation: dict, auth: bool, open_paths: frozenset) -> bool:
    """Whether a :data:`COMMON` status can be the answer of this operation."""
    if status == 401:
        return auth and path not in open_paths
    if status == 422:
        return bool(operation.get("parameters") or operation.get("requestBody"))
    if status == 400:  # FastAPI's body parser
        return "application/json" in (operation.get("requestBody") or {}).get("content", {})
    if status == 413:  # the body guard
        return method.upper() in BODY_METHODS
    return True


def document(app: FastAPI, auth: bool, open_paths: Iterable[str]) -> None:
    """Settle the schema of every operation, however its route was added (decorated here or included from another
    module's router): keep the :data:`COMMON` statuses that apply to it (see the module docstring), give every error
    status the one error body as JSON, and with ``auth`` mark every operation but the open paths as needing the
    bearer token (so clients and fuzzers know to send it). Works on the generated document, once."""
    open_paths = frozenset(open_paths)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            if auth:
                schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                    "type": "http", "scheme": "bearer",
                    "description": "the station's token (--token / WINCLIP_TOKEN); browsers: the winclip_token cookie"}
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    answers = operation.get("responses", {})
                    for status in COMMON:
                        if str(status) in answers and not _applies(status, path, method, operation, auth, open_paths):
                            del answers[str(status)]
                    for status, answer in answers.items():
                        if status[:1] in "45":  # FastAPI files them under a route's own media type (text/plain)
                            answer["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
                    if auth and path not in open_paths:
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["COMMON", "ErrorBody", "document", "error", "install_handlers", "responses"]
