"""The OpenAPI schema says what the service does, for every route of the app, routers added later included: each
operation documents 401 exactly when a token is set (and not on the open paths), 422 where it validates anything,
every error status its own code answers, all of them with the one error body; path parameters carry the patterns
of the checks that enforce them; /metrics is text. The answers themselves are checked against it from outside by
schemathesis (tests/test_api_fuzz.py)."""
from __future__ import annotations

import inspect
import re
import textwrap
import types
from typing import Annotated

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI, Path  # noqa: E402
from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from winclip_edge.catalog import Catalog  # noqa: E402
from winclip_edge.batcher import Batcher  # noqa: E402
from winclip_edge.names import NAME_PATTERN, NAME_RULE  # noqa: E402
from winclip_edge.service.app import ServiceContext, create_app  # noqa: E402
from winclip_edge.service.auth import OPEN_PATHS  # noqa: E402
from winclip_edge.service.config import HttpConfig  # noqa: E402
from winclip_edge.service.errors import ERROR_REF  # noqa: E402
from winclip_edge.service.metrics import ServiceMetrics  # noqa: E402
from winclip_edge.service.params import ID_SCHEMA_PATTERN, NAME_SCHEMA_PATTERN, ProductName  # noqa: E402
from winclip_edge.service.store import ID_PATTERN, ResultStore  # noqa: E402
from winclip_edge.review import ReviewDB  # noqa: E402
from winclip_edge.service.review_api import Review  # noqa: E402

TOKEN = "t0ken-" + "x" * 26


@pytest.fixture(scope="module")
def catalog(tiny_bundle):
    catalog = Catalog(tiny_bundle, ["widget"])
    yield catalog
    catalog.close()


def make_app(catalog, tmp_path, token=None) -> FastAPI:
    batchers = {"widget": Batcher(catalog.get("widget"), 2, 5.0, 8)}
    ctx = ServiceContext(config=HttpConfig(port=0, token=token, max_upload_mb=1), catalog=catalog, batchers=batchers,
                         store=ResultStore(tmp_path / "review"), metrics=ServiceMetrics(batchers), station="s1")
    ctx.review = Review(ctx, ReviewDB(tmp_path / "review.db"))  # the review routes (review_api.py) as serve has them
    ctx.ready.set()
    return create_app(ctx)


def api_routes(routes, prefix: str = ""):
    """(full path, APIRoute) of every route, also those of included routers (FastAPI >= 0.16x keeps an included
    router as one entry of ``app.routes``; older versions copy its routes in)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes, prefix + route.include_context.prefix)


def operations(schema: dict):
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            yield path, method, op


# ---------------------------------------------------------------- what each route's own code answers
STATUS_CALL = re.compile(r"\b(?:error|UploadError)\(\s*(\d{3})\b")


def _functions_reached(fn: types.FunctionType, seen: set) -> list[types.FunctionType]:
    """``fn`` and the functions of winclip_edge.service it calls, through closures and globals, recursively."""
    if fn in seen or not getattr(fn, "__module__", "").startswith("winclip_edge.service"):
        return []
    seen.add(fn)
    found = [fn]
    cells = [c.cell_contents for c in (fn.__closure__ or ()) if _filled(c)]
    names = [fn.__globals__.get(n) for n in fn.__code__.co_names]
    for target in cells + names:
        target = getattr(target, "__wrapped__", target)
        if isinstance(target, types.FunctionType):
            found += _functions_reached(target, seen)
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def statuses_answered(route: APIRoute) -> set[int]:
    """The error statuses written in the route's code and in the service functions it calls."""
    found = set()
    for fn in _functions_reached(route.endpoint, set()):
        found |= {int(s) for s in STATUS_CALL.findall(textwrap.dedent(inspect.getsource(fn)))}
    return found


def test_the_status_scan_finds_what_a_route_answers():
    """The scan must see statuses in helpers the route calls (else the next test proves nothing)."""
    from winclip_edge.service import app as app_module

    source = inspect.getsource(app_module)
    assert "_checked" in source and STATUS_CALL.search(source)
    fake = FastAPI()

    @fake.get("/x")
    def x():
        return helper()

    def helper():
        from winclip_edge.service.errors import error
        return error(418, "teapot", "short and stout")

    helper.__module__ = x.__module__ = "winclip_edge.service.fake"
    route = next(r for r in fake.routes if isinstance(r, APIRoute) and r.path == "/x")
    assert statuses_answered(route) == {418}


# ---------------------------------------------------------------- the walk
@pytest.mark.parametrize("token", [None, TOKEN])
def test_every_operation_documents_what_it_answers(catalog, tmp_path, token):
    app = make_app(catalog, tmp_path, token)
    schema = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}).get("/openapi.json").json()
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])  # FastAPI's 422 body
    routes = {(path, m.lower()): r for path, r in api_routes(app.routes) if r.include_in_schema for m in r.methods}
    seen = 0
    for path, method, op in operations(schema):
        route = routes[(path, method)]
        documented = {int(s) for s in op["responses"] if s[0] in "45"}
        inputs = bool(op.get("parameters") or op.get("requestBody"))
        where = f"{method.upper()} {path}"
        assert (422 in documented) == inputs, where
        secured = token is not None and path not in OPEN_PATHS
        assert (401 in documented) == secured and ("security" in op) == secured, where
        assert statuses_answered(route) <= documented, f"{where} answers statuses it does not document"
        for status in documented:
            assert op["responses"][str(status)]["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, \
                f"{where} {status}"
        if method in ("post", "put", "patch"):
            assert 413 in documented, where  # the body guard answers it on every route that takes a body
        for param in op.get("parameters", []):
            if param["in"] == "path":
                assert param["schema"].get("pattern") in (NAME_SCHEMA_PATTERN, ID_SCHEMA_PATTERN), where
        seen += 1
    assert seen == len(routes) >= 19
    assert {"/v1/results/{rid}/verdict", "/v1/products/{product}/rollback"} <= set(schema["paths"])
    assert schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
    assert schema["paths"]["/v1/results/{rid}/overlay.png"]["get"]["responses"]["200"]["content"].keys() == {"image/png"}
    assert NAME_SCHEMA_PATTERN == f"^{NAME_PATTERN.pattern}$" and ID_SCHEMA_PATTERN == f"^{ID_PATTERN.pattern}$"
    if token is not None:
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_a_router_added_later_is_documented_the_same_way():
    """What a module like service/review_api.py gets by including its router before errors.document runs (its
    annotations name module-level types: with ``from __future__ import annotations`` FastAPI resolves them there)."""
    from fastapi import APIRouter

    from winclip_edge.service.errors import COMMON, document, error, responses

    router = APIRouter()

    @router.post("/v1/products/{product}/teach", responses=responses(404, 409))
    def teach(product: Annotated[ProductName, Path()]):
        return error(409, "busy", "a teach runs")

    @router.get("/v1/versions")
    def versions():
        return {}

    teach.__module__ = "winclip_edge.service.review_api"  # where such a router lives (the scan reads the service's)

    app = FastAPI(responses=responses(*COMMON))
    app.include_router(router)
    document(app, auth=True, open_paths=())
    ops = dict(((p, m), o) for p, m, o in operations(app.openapi()))
    assert set(ops[("/v1/products/{product}/teach", "post")]["responses"]) == {"200", "401", "404", "409", "413", "422"}
    assert set(ops[("/v1/versions", "get")]["responses"]) == {"200", "401"}
    assert ops[("/v1/versions", "get")]["security"] == [{"bearer": []}]
    included = dict(api_routes(app.routes))
    assert set(included) == {"/v1/products/{product}/teach", "/v1/versions"}
    assert statuses_answered(included["/v1/products/{product}/teach"]) == {409}


# ---------------------------------------------------------------- the answers have the documented body
def test_errors_of_the_router_and_the_validation_have_the_one_body(catalog, tmp_path):
    client = TestClient(make_app(catalog, tmp_path))
    for bad in ("a+b", "metal nut", "ünï", "x" * 65):
        r = client.post(f"/v1/products/{bad}/reload")
        assert r.status_code == 422 and r.json()["error"] == "bad_name" and NAME_RULE in r.json()["detail"], r.text
        r = client.get("/v1/results", params={"product": bad})
        assert r.status_code == 422 and r.json()["error"] == "bad_name"
    r = client.post("/v1/inspect", params={"product": "a#b"}, content=b"x")
    assert r.status_code == 422 and r.json()["error"] == "bad_name"
    assert client.post("/v1/inspect", params={"product": "bolt"}, content=b"x").json()["error"] == "unknown_product"
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "Not Found"}
    r = client.delete("/v1/products")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed" and r.headers["allow"] == "GET, POST"
    r = client.post("/v1/products", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and set(r.json()) == {"error", "detail"}
    r = client.post("/v1/products", json={"name": "cable", "normal_states": ["no placeholder"]})
    assert r.status_code == 422 and r.json()["error"] == "bad_prompt"
    r = client.get(f"/v1/results/{'A' * 32}")
    assert r.status_code == 422 and r.json()["error"] == "bad_id"
    r = client.post("/v1/inspect", params={"product": "widget"}, content=b"0" * (2 * 2**20))
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
