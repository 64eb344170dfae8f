"""The HTTP face of a station (FastAPI): inspect an uploaded image, browse results, products, health, metrics.

Requests never touch the engine themselves: an upload is decoded here (exactly as ``infer`` decodes a
file) and handed to the product's Batcher, the same one its live sources use, so concurrent requests
share engine calls. Whatever one request does wrong ends as that request's own 4xx; the engine, the
queue and the other requests go on. Endpoints are listed in docs/service.md (and at ``/docs``).

The OpenAPI schema says what the service does (tests/test_api_schema.py checks it, schemathesis fuzzes it): a
route types its parameters with params.py (the patterns of the checks that enforce them) and declares the error
statuses it answers itself with ``responses=responses(...)`` (errors.py); the statuses every route may answer
(401, 422, 400, 413) are added by the app and kept where they apply (errors.document). A router of another
module (``app.include_router``) is covered the same way when it is included before ``document`` runs.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, List, Literal, Mapping, Optional, Union

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..catalog import Catalog, UnknownProduct
from ..errors import WinclipError
from ..inspector import InspectionResult
from ..batcher import Batcher, BatcherClosed, BatcherFull, Job
from ..control import MAX_PART_ID, ControlRefused, PartRefused, Trigger
from ..names import InvalidName
from ..rows import ResultRow
from ..prompts import OBJECT, PROMPT_STYLES, STATE, PromptError, PromptSpec, object_name_for
from ..text_encoder import ProductExistsError, add_product as encode_product
from .auth import OPEN_PATHS, TokenAuth
from .config import HttpConfig
from .errors import COMMON, document, error, install_handlers, responses
from .guard import BodyGuard
from .metrics import CONTENT_TYPE, ServiceMetrics
from .params import ProductName, ProductPath, Rid
from .store import FILES, ResultStore, valid_id
from .uploads import FORM_FIELDS, UploadError, decode_upload, read_upload

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {"image": "image/jpeg", "overlay": "image/png", "map": "application/octet-stream"}
MAX_LIST = 500
MAX_PROMPT_ITEMS = 64  # extra states / templates of one product (each becomes 22+ prompts to encode)
MAX_PROMPT_TEXT = 300  # characters of one state, template or object name (the tokenizer keeps 77 tokens)
BINARY = {"schema": {"type": "string", "format": "binary"}}
# /v1/inspect reads its body itself (raw image bytes, or multipart with the file in field 'image'): documented here.
INSPECT_BODY = {"requestBody": {"required": True, "description": "the image file: raw body, or multipart field 'image'",
                                "content": {"application/octet-stream": BINARY, "image/png": BINARY, "image/jpeg": BINARY,
                                            "multipart/form-data": {"schema": {
                                                "type": "object", "required": [FORM_FIELDS[0]],
                                                "properties": {FORM_FIELDS[0]: {"type": "string", "format": "binary"}}}}}}}


@dataclass
class ServiceContext:
    """Everything the endpoints use; built once by :func:`winclip_edge.service.start_http`."""

    config: HttpConfig
    catalog: Catalog
    batchers: Mapping[str, Batcher]
    store: ResultStore
    metrics: ServiceMetrics
    station: str
    ready: threading.Event = field(default_factory=threading.Event)
    on_decision: Optional[Callable[[dict], None]] = None  # the station counts HTTP decisions with its own
    review: Any = None  # review_api.Review: verdicts, teach, rollback, drift (None: not served)
    # The station's triggered parts (docs/line.md, "Triggered parts"): set by the station that runs this face.
    trigger: Optional[Callable[[Trigger], Any]] = None  # POST /v1/trigger
    upload_part: Optional[Callable[..., Any]] = None  # POST /v1/inspect?part_id=...: (part_id, product, image, name,
    # received_at, timeout) -> a Future of the part's row




def _containing(placeholder: str, example: str) -> Any:
    """A text that must contain ``placeholder``: prompts.build_prompts checks it (``bad_prompt``), the schema says it."""
    return Field(max_length=MAX_PROMPT_TEXT, json_schema_extra={"pattern": re.escape(placeholder)}, examples=[example])


State = Annotated[str, _containing(OBJECT, "{o} with a scratch")]
Template = Annotated[str, _containing(STATE, "a close-up photo of {c}.")]


class NewProduct(BaseModel):
    """``POST /v1/products``: a product named on the line, encoded by the bundle's text encoder (no torch)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "metal_nut", "object_name": "metal nut",
                                                               "anomalous_states": ["{o} with a bent thread"]}]})
    name: ProductName
    object_name: Optional[str] = Field(None, max_length=MAX_PROMPT_TEXT)  # default: the name with _ -> space
    normal_states: List[State] = Field([], max_length=MAX_PROMPT_ITEMS)  # extra states, "{o}" = the object
    anomalous_states: List[State] = Field([], max_length=MAX_PROMPT_ITEMS)
    templates: List[Template] = Field([], max_length=MAX_PROMPT_ITEMS)  # extra templates, "{c}" = the state phrase
    prompt_style: Literal[PROMPT_STYLES] = "cpe"  # type: ignore[valid-type]
    force: bool = False  # re-encode a product that exists


class TriggerBody(BaseModel):
    """``POST /v1/trigger``: a part in front of the station's cameras (docs/line.md, "Triggered parts")."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"part_id": "4711", "product": "widget"}]})
    part_id: Union[str, int]  # checked by the station (1-128 printable characters): a refusal is a 409
    product: Optional[ProductName] = None  # default: the prepared recipe
    meas_id: str = Field("", max_length=MAX_PART_ID)


def _refusal(err: Exception) -> tuple[int, str, str]:
    """The answer to a trigger or part upload the station refused: (status, kind, detail)."""
    if isinstance(err, PartRefused):
        return 409, "part_refused", str(err)
    if isinstance(err, ControlRefused):
        return 409, "refused", str(err)
    return 404, "unknown_product", str(err).strip("'\"")  # KeyError: a product the station does not serve


def _urls(rid: str) -> dict[str, str]:
    base = f"/v1/results/{rid}"
    return {"self": base, "image": f"{base}/image.jpg", "overlay": f"{base}/overlay.png", "map": f"{base}/map.npy"}


def _with_urls(record: dict) -> dict:
    return {**record, "urls": _urls(record["id"])}


def create_app(ctx: ServiceContext) -> FastAPI:
    app = FastAPI(title="winclip-edge station", version="1", responses=responses(*COMMON),
                  description="Anomaly inspection of uploaded images; results, products, health and metrics. "
                              "Every error is {\"error\": kind, \"detail\": text} (docs/service.md).")
    metrics, store, catalog = ctx.metrics, ctx.store, ctx.catalog

    def _decided(row: dict) -> None:
        """The station counts HTTP decisions with its sources' (status line, Station.stats)."""
        if ctx.on_decision is not None:
            ctx.on_decision(row)

    install_handlers(app, lambda kind: metrics.errors.labels(kind).inc())

    @app.get("/healthz", summary="The process is up (no auth)")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Engine loaded and warmed up: the station takes requests", responses=responses(503))
    def readyz():
        if not ctx.ready.is_set():
            return error(503, "not_ready", "the engine is still loading / warming up")
        return {"status": "ready", "products": catalog.products, "engine": catalog.engine.name,
                "device": catalog.engine.device}

    @app.post("/v1/trigger", status_code=202, summary="Trigger a part: its views are captured, one row per part",
              responses=responses(404, 409, 503))
    async def trigger(body: TriggerBody):
        if ctx.trigger is None:
            return error(503, "no_parts", "this face runs without a station that takes triggers")
        job_id = uuid.uuid4().hex
        try:
            part = await run_in_threadpool(ctx.trigger, Trigger(part_id=str(body.part_id), product=body.product,
                                                                meas_id=body.meas_id, job_id=job_id, source="http"))
        except (ControlRefused, KeyError) as err:
            return error(*_refusal(err))
        return {"part_id": part.part_id, "job_id": job_id, "product": part.product,
                "deadline_ms": None if part.deadline_at is None else round((part.deadline_at - part.triggered_at) * 1e3, 3)}

    async def inspect_part(part_id: str, product: str, image, label: str, received: float):
        """An upload with a part id: the part's view through the station (its row in results.jsonl and every sink,
        its deadline); the answer is the part's row (or, after its fail-safe, the late result)."""
        try:
            future = await run_in_threadpool(ctx.upload_part, part_id, product, image, label, received,
                                             ctx.config.submit_timeout_s)
            row = await asyncio.wait_for(asyncio.wrap_future(future), ctx.config.result_timeout_s)
        except (ControlRefused, KeyError) as err:
            raise UploadError(*_refusal(err)) from None
        except (BatcherFull, BatcherClosed) as err:
            raise UploadError(503, "busy", str(err)) from None
        except asyncio.TimeoutError:
            raise UploadError(504, "timeout", f"no result within {ctx.config.result_timeout_s:g} s") from None
        return {**row, "urls": _urls(row["id"])}

    @app.post("/v1/inspect", summary="Inspect one image (raw body or multipart field 'image')", openapi_extra=INSPECT_BODY,
              responses=responses(404, 409, 413, 500, 503, 504, 507))
    async def inspect(request: Request, product: Annotated[ProductName, Query(description="product to inspect it as")],
                      name: Annotated[Optional[str], Query(description="a name for the image (default: its file name)",
                                                           examples=["part0042.png"])] = None,
                      part_id: Annotated[Optional[str], Query(
                          min_length=1, max_length=MAX_PART_ID, examples=["4711"],
                          description="the part this image shows: a view of a triggered part, or a part of its own "
                                      "(docs/line.md)")] = None):
        received = time.time()
        t0 = time.perf_counter()
        try:
            batcher = ctx.batchers.get(product)
            if batcher is None:
                raise UploadError(404, "unknown_product", f"unknown product {product!r}; this station serves {catalog.products}")
            data, filename = await read_upload(request, ctx.config.max_upload_bytes)
            label = name or filename or "upload"
            t1 = time.perf_counter()
            image = await run_in_threadpool(decode_upload, data, label)
            t2 = time.perf_counter()
            if part_id is not None:
                if ctx.upload_part is None:
                    raise UploadError(503, "no_parts", "this face runs without a station that takes parts")
                return await inspect_part(part_id, product, image, label, received)
            job = Job(name=label, image=image, metadata={"source": "http"}, keep_image=True)
            try:
                future = await run_in_threadpool(batcher.submit, job, True, ctx.config.submit_timeout_s)
                result: InspectionResult = await asyncio.wait_for(asyncio.wrap_future(future), ctx.config.result_timeout_s)
            except (BatcherFull, BatcherClosed) as err:
                raise UploadError(503, "busy", str(err)) from None
            except asyncio.TimeoutError:
                raise UploadError(504, "timeout", f"no result within {ctx.config.result_timeout_s:g} s") from None
            if result.error is not None:
                failed = ResultRow.of(result, job.ids, received, (time.perf_counter() - t0) * 1e3,
                                      decided_at=time.time(), station=ctx.station, source="http", file=label).as_dict()
                _decided(failed)
                metrics.observe_result(product, "http", None, result.error, result.timings_ms, None)
                raise UploadError(500, "inspection_failed", result.error)
        except UploadError as err:
            metrics.errors.labels(err.kind).inc()
            return error(err.status, err.kind, err.detail)
        # decode = bytes -> RGB here + the resize to the model input in submit
        result.timings_ms.update(upload=(t1 - t0) * 1e3, decode=(t2 - t1) * 1e3 + result.timings_ms.get("decode", 0.0))
        t3 = time.perf_counter()
        row = ResultRow.of(result, job.ids, received, (t3 - t0) * 1e3, decided_at=time.time(),
                           station=ctx.station, source="http", file=label).as_dict()
        urls = _urls(row["id"])
        row.update(overlay=urls["overlay"], map=urls["map"])
        _decided(row)
        try:
            rid = await run_in_threadpool(store.add, row, result)
        except OSError as err:
            metrics.errors.labels("store").inc()
            return error(507, "store_failed", f"the result could not be stored ({err}); score {result.score}")
        result.timings_ms["store"] = (time.perf_counter() - t3) * 1e3
        metrics.observe_result(product, "http", result.anomalous, None, result.timings_ms, time.perf_counter() - t0)
        return _with_urls(store.get(rid))

    @app.get("/v1/results", summary="Newest results first")
    def results(limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 50, anomalous: Optional[bool] = None,
                product: Annotated[Optional[ProductName], Query(description="only this product's")] = None) -> dict:
        return {"results": _reviewed([_with_urls(r) for r in store.newest(limit, anomalous, product)]),
                "kept": len(store)}

    def _reviewed(records: list[dict]) -> list[dict]:
        """Each record with its operator's verdict (``review``), when the review loop is served."""
        return records if ctx.review is None else ctx.review.marked(records)

    def _checked(rid: str):
        if not valid_id(rid):
            metrics.errors.labels("bad_id").inc()
            return error(422, "bad_id", "a result id is 32 lower-case hex digits")
        if store.get(rid) is None:
            return error(404, "not_found", f"no result {rid} (unknown, or older than the newest "
                                            f"{ctx.config.keep_results} kept)")
        return None

    @app.get("/v1/results/{rid}", summary="One result", responses=responses(404))
    def result(rid: Rid):
        return _checked(rid) or _reviewed([_with_urls(store.get(rid))])[0]

    def _file(rid: str, kind: str):
        problem = _checked(rid)
        if problem is not None:
            return problem
        path = store.file(rid, kind)
        if path is None:
            return error(404, "not_found", f"result {rid} has no {kind}")
        return FileResponse(path, media_type=MEDIA_TYPES[kind], filename=f"{rid}{FILES[kind]}")

    @app.get("/v1/results/{rid}/overlay.png", summary="Heatmap over the image, with score and verdict", response_class=FileResponse,
             responses={200: {"content": {"image/png": BINARY}, "description": "Heatmap over the image, with score and verdict"}, **responses(404)})
    def result_overlay(rid: Rid):
        return _file(rid, "overlay")

    @app.get("/v1/results/{rid}/map.npy", summary="Anomaly map, float32 [H, W], values in [0, 1]", response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": BINARY}, "description": "Anomaly map, float32 [H, W], values in [0, 1]"}, **responses(404)})
    def result_map(rid: Rid):
        return _file(rid, "map")

    @app.get("/v1/results/{rid}/image.jpg", summary="The inspected image", response_class=FileResponse,
             responses={200: {"content": {"image/jpeg": BINARY}, "description": "The inspected image"}, **responses(404)})
    def result_image(rid: Rid):
        return _file(rid, "image")

    def _product(p: str) -> dict:
        m = catalog.bundle.manifest
        return {**asdict(catalog.info(p)), "model": m.model, "weights_id": m.weights_id}

    @app.get("/v1/products", summary="Products served: model, memory, threshold, calibration date")
    def products() -> dict:
        return {"products": [_product(p) for p in catalog.products]}

    @app.post("/v1/products/{product}/reload", summary="Re-read a product's files (after register/calibrate)",
              responses=responses(404, 409))
    async def reload(product: ProductPath):
        if product not in ctx.batchers:
            metrics.errors.labels("unknown_product").inc()
            return error(404, "unknown_product", f"unknown product {product!r}; this station serves {catalog.products}")
        try:
            inspector = await run_in_threadpool(catalog.reload, product)
        except (UnknownProduct, WinclipError) as err:
            metrics.reloads.labels(product, "failed").inc()
            return error(409, "reload_failed", f"{err} (the previous files stay in use)")
        ctx.batchers[product].inspector = inspector  # the next batch is scored with the new files
        metrics.reloads.labels(product, "ok").inc()
        return _product(product)

    adding = asyncio.Lock()  # one product at a time: encoding its prompts takes the CPU for a while

    @app.post("/v1/products", status_code=201, responses=responses(409),
              summary="Add (or with force re-encode) a product by name with the bundle's text encoder, and serve it")
    async def add_product(body: NewProduct):
        spec = PromptSpec(object_name=body.object_name or object_name_for(body.name), style=body.prompt_style,
                          extra_normal_states=tuple(body.normal_states),
                          extra_anomalous_states=tuple(body.anomalous_states), extra_templates=tuple(body.templates))
        async with adding:
            try:
                text = await run_in_threadpool(encode_product, catalog.bundle, body.name, spec, "fp32", body.force)
            except ProductExistsError as err:
                return error(409, "product_exists", str(err))
            except InvalidName as err:  # the name follows the rule (checked above) but clashes with one but for case
                return error(409, "name_clash", str(err))
            except PromptError as err:
                return error(422, "bad_prompt", str(err))
            except WinclipError as err:  # no text encoder, a damaged one, a bad name: nothing was written
                metrics.errors.labels("add_product").inc()
                return error(409, "add_product_failed", str(err))
            try:
                if body.name in ctx.batchers:
                    inspector = await run_in_threadpool(catalog.reload, body.name)
                    ctx.batchers[body.name].inspector = inspector  # the next batch uses the new prototypes
                else:
                    inspector = await run_in_threadpool(catalog.add, body.name)
                    first = next(iter(ctx.batchers.values()))
                    ctx.batchers[body.name] = Batcher(inspector, first.max_batch, first.max_wait * 1e3, first.queue_size)
            except WinclipError as err:
                return error(409, "add_product_failed", f"{body.name!r} was written but cannot be served: {err}")
        return {**_product(body.name), "prompts": {"normal": len(text.normal_prompts),
                                                   "anomalous": len(text.anomalous_prompts)}, "encoder": text.encoder}

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if ctx.review is not None:  # verdicts, queue, teach, rollback, versions, drift (review_api.py)
        app.include_router(ctx.review.router(_with_urls))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Routers of other modules are included above this line; then every route's statuses are settled.
    document(app, auth=ctx.config.auth, open_paths=OPEN_PATHS)
    app.add_middleware(CountRequests, count=lambda route, status: metrics.requests.labels(route, status).inc())
    if ctx.config.auth:
        app.add_middleware(TokenAuth, token=ctx.config.token, tokens=ctx.config.tokens,
                           on_denied=lambda: metrics.errors.labels("unauthorized").inc())
    app.add_middleware(BodyGuard, limit=ctx.config.max_upload_bytes, on_refused=lambda: metrics.errors.labels("too_large").inc())
    return app


class CountRequests:
    """ASGI middleware: winclip_http_requests_total by route template (``unmatched`` for none) and status."""

    def __init__(self, app, count: Callable[[str, str], None]):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.count(getattr(scope.get("route"), "path", "unmatched"), str(status["code"]))
