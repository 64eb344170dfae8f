"""The review loop over HTTP: operators' verdicts, the queue "flagged, not reviewed", teach, rollback, product
versions and drift (docs/service.md, "Verdicts, versions and drift").

A verdict is recorded under the name of the token that carried it (service/auth.py; ``anonymous`` on a station
without tokens) in the review database (review.py: SQLite, WAL, synchronous=FULL) and answered 200 only once it is
committed. Teach and rollback make another product version live (teaching.py, versions.py) and switch the running
station to it: the catalog reads the version into a complete new Inspector and the product's batcher takes it for
its next batch (winclip_edge/batcher.py), so no frame is lost and none is scored half by one version and half by the other;
every row names the version that decided it. A version that cannot be served is refused by its number; when the
version a teach or rollback made live then fails to load, the pointer goes back to the version served before,
which keeps serving.
"""
from __future__ import annotations

import asyncio
import sqlite3
from typing import Annotated, Any, Callable, Literal, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..bundle import BundleError
from ..errors import WinclipError
from ..review import MAX_NOTE, ReviewDB, ReviewError, Verdict, lossless_source
from ..teaching import NothingToTeach, TeachConfig, product_versions, rollback, teach_from_review
from ..versions import UnknownVersion
from .errors import error, responses
from .params import ProductName, ProductPath, Rid
from .store import valid_id

ANONYMOUS = "anonymous"  # the operator of a verdict on a station without tokens
MAX_QUEUE = 500


class VerdictBody(BaseModel):
    """``POST /v1/results/{id}/verdict``: an operator's verdict on one result."""

    model_config = ConfigDict(extra="forbid")
    verdict: Literal["good", "defect"]
    note: str = Field("", max_length=MAX_NOTE)


class TeachBody(BaseModel):
    """``POST /v1/products/{p}/teach`` (every field optional; no body = the defaults)."""

    model_config = ConfigDict(extra="forbid")
    note: str = Field("", max_length=MAX_NOTE, description="kept in the version's version.json")
    all_good: bool = Field(False, description="every good verdict with a kept image, not only false alarms")
    false_alarm_rate: Optional[float] = Field(None, ge=0, le=1, description="target (default: the live threshold's)")


class RollbackBody(BaseModel):
    """``POST /v1/products/{p}/rollback``."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., ge=1, description="the version to serve")


def operator_of(request: Request) -> str:
    """The name of the token the request carried (service/auth.py), never the token."""
    return request.scope.get("state", {}).get("operator") or ANONYMOUS


def verdict_json(v: Verdict) -> dict:
    """A verdict as the API answers it (the kept image's path stays on the station)."""
    d = v.to_dict()
    d.pop("image")
    return {**d, "teachable": v.image is not None}


class Review:
    """The review loop of one HTTP face: its ReviewDB, the station's DriftWatch, the routes (:meth:`router`)."""

    def __init__(self, ctx: Any, db: ReviewDB, drift: Any = None):
        self.ctx, self.db, self.drift = ctx, db, drift
        self.changing = asyncio.Lock()  # one teach or rollback at a time (they embed, write and reload)
        if drift is not None:
            drift.history = self.history
        ctx.metrics.watch_review(self.versions_served, self.queue_sizes, None if drift is None else drift.snapshot)

    # ------------------------------------------------------------ reading
    def history(self, product: str, version: int | None) -> tuple[list[float], list[tuple[str, bool]]]:
        """What a new drift tracker replays (line/drift_watch.py): the kept scores and the verdicts of ``version``,
        oldest first."""
        store = self.ctx.store
        records = reversed(store.newest(store.capacity, product=product))
        scores = [r["score"] for r in records
                  if r.get("version") == version and r.get("score") is not None and r.get("error") is None]
        latest = self.db.verdicts(product, limit=self.drift.window if self.drift is not None else None)
        verdicts = [(v.verdict, v.anomalous is True) for v in reversed(latest) if v.version == version]
        return scores, verdicts

    def marked(self, records: list[dict]) -> list[dict]:
        """``records`` with ``review``: the verdict that counts for each (null: not reviewed)."""
        latest = self.db.latest_for(r["id"] for r in records)
        for r in records:
            v = latest.get(r["id"])
            r["review"] = None if v is None else {"verdict": v.verdict, "operator": v.operator, "at": v.at,
                                                  "note": v.note}
        return records

    def waiting(self, product: str | None = None) -> tuple[list[dict], int]:
        """The flagged results kept that no one reviewed, newest first, and how many flagged results are kept."""
        store = self.ctx.store
        flagged = store.newest(store.capacity, anomalous=True, product=product)
        open_ids = set(self.db.unreviewed(r["id"] for r in flagged))
        return [r for r in flagged if r["id"] in open_ids], len(flagged)

    def queue_sizes(self) -> dict[str, int]:
        waiting, _ = self.waiting()
        sizes = {p: 0 for p in self.ctx.catalog.products}
        for r in waiting:
            sizes[r.get("product")] = sizes.get(r.get("product"), 0) + 1
        return sizes

    def versions_served(self) -> dict[str, int | None]:
        catalog = self.ctx.catalog
        return {p: catalog.info(p).version for p in catalog.products}

    # ------------------------------------------------------------ switching versions
    async def _serve(self, product: str, operator: str, fallback: int | None):
        """Serve the product's live version: read into the catalog, then handed to the product's batcher. On a
        failure the pointer goes back to ``fallback`` (the version served before); 409 naming the version."""
        ctx = self.ctx
        try:
            inspector = await run_in_threadpool(ctx.catalog.reload, product)
        except WinclipError as err:
            ctx.metrics.reloads.labels(product, "failed").inc()
            back = ""
            if fallback is not None:
                try:
                    await run_in_threadpool(rollback, ctx.catalog.bundle, product, fallback, operator, self.db)
                    back = f"; version {fallback} is live again"
                except WinclipError as again:
                    back = f"; putting version {fallback} back failed too ({again})"
            return error(409, "reload_failed", f"{err} (the station keeps serving what it served{back})")
        ctx.batchers[product].inspector = inspector  # the next batch is scored by the new version
        ctx.metrics.reloads.labels(product, "ok").inc()
        return None

    def _product_or_404(self, product: str):
        if product not in self.ctx.batchers:
            self.ctx.metrics.errors.labels("unknown_product").inc()
            return error(404, "unknown_product",
                         f"unknown product {product!r}; this station serves {self.ctx.catalog.products}")
        return None

    # ------------------------------------------------------------ the routes
    def router(self, with_urls: Callable[[dict], dict]) -> APIRouter:
        ctx, db = self.ctx, self.db
        store, catalog, metrics = ctx.store, ctx.catalog, ctx.metrics
        api = APIRouter()

        @api.post("/v1/results/{rid}/verdict", summary="An operator's verdict on a result: good or defect, with a note",
                  responses=responses(401, 404, 422, 507))
        async def give_verdict(rid: Rid, body: VerdictBody, request: Request):
            if not valid_id(rid):
                metrics.errors.labels("bad_id").inc()
                return error(422, "bad_id", "a result id is 32 lower-case hex digits")
            record = store.get(rid)
            if record is None:
                return error(404, "not_found", f"no result {rid} (unknown, or older than the newest "
                                                f"{ctx.config.keep_results} kept)")
            operator = operator_of(request)

            def record_it() -> Verdict:
                image = lossless_source(record, store.file(rid, "original")) if body.verdict == "good" else None
                return db.record(rid, record.get("product") or "", body.verdict, operator, body.note,
                                 score=record.get("score"), threshold=record.get("threshold"),
                                 anomalous=record.get("anomalous"), version=record.get("version"), image=image)

            try:
                verdict = await run_in_threadpool(record_it)
            except ReviewError as err:
                metrics.errors.labels("bad_verdict").inc()
                return error(422, "bad_verdict", str(err))
            except (sqlite3.Error, OSError) as err:
                metrics.errors.labels("review").inc()
                return error(507, "review_failed", f"the verdict could not be stored ({err}); give it again")
            metrics.reviews.labels(verdict.product, verdict.verdict).inc()
            if self.drift is not None:
                self.drift.verdict(verdict.product, verdict.version, verdict.verdict, verdict.anomalous is True)
            return verdict_json(verdict)

        @api.get("/v1/results/{rid}/verdicts", summary="Every verdict given on a result, oldest first",
                 responses=responses(401, 404, 422))
        def verdict_history(rid: Rid):
            if not valid_id(rid):
                return error(422, "bad_id", "a result id is 32 lower-case hex digits")
            history = db.history(rid)
            if not history and store.get(rid) is None:
                return error(404, "not_found", f"no result {rid} and no verdict on it")
            return {"result_id": rid, "verdicts": [verdict_json(v) for v in history]}

        @api.get("/v1/review/queue", summary="Flagged results nobody reviewed yet (newest first), with the counts",
                 responses=responses(401, 422))
        def review_queue(product: Annotated[Optional[ProductName], Query(description="only this product's")] = None,
                         limit: Annotated[int, Query(ge=1, le=MAX_QUEUE)] = 50) -> dict:
            waiting, flagged = self.waiting(product)
            products = [product] if product is not None else catalog.products
            return {"queue": [with_urls(r) for r in waiting[:limit]], "waiting": len(waiting), "flagged": flagged,
                    "counts": {p: db.counts(p) for p in products}}

        @api.get("/v1/products/{product}/versions", summary="A product's versions, oldest first; live and served marked",
                 responses=responses(401, 404))
        async def versions(product: ProductPath):
            problem = self._product_or_404(product)
            if problem is not None:
                return problem
            statuses = await run_in_threadpool(product_versions, catalog.bundle, product)
            return {"product": product, "serving": catalog.info(product).version,
                    "versions": [s.to_dict() for s in statuses]}

        @api.post("/v1/products/{product}/teach", summary="Teach the product its good verdicts (false alarms by "
                  "default) as a new version, and serve it", responses=responses(401, 404, 409, 422))
        async def teach(product: ProductPath, request: Request, body: Optional[TeachBody] = None):
            problem = self._product_or_404(product)
            if problem is not None:
                return problem
            body = body or TeachBody()
            operator = operator_of(request)
            config = TeachConfig(target_false_alarm_rate=body.false_alarm_rate, flagged_only=not body.all_good,
                                 note=body.note)
            async with self.changing:
                served = catalog.info(product).version
                try:
                    taught = await run_in_threadpool(teach_from_review, db, catalog.bundle, product, operator,
                                                     config=config, engine=catalog.engine, options=catalog.options)
                except NothingToTeach as err:
                    metrics.changes.labels(product, "teach", "nothing").inc()
                    return error(409, "nothing_to_teach", f"{err}; the served version is unchanged")
                except WinclipError as err:
                    metrics.changes.labels(product, "teach", "failed").inc()
                    return error(409, "teach_failed", f"{err}; the served version is unchanged")
                v = taught.version
                problem = await self._serve(product, operator, served if served is not None else v.parent)
                if problem is not None:
                    metrics.changes.labels(product, "teach", "failed").inc()
                    return problem
            metrics.changes.labels(product, "teach", "ok").inc()
            results = [t["result_id"] for t in db.taught(product) if t["version"] == v.number]
            return {"product": product, "version": v.number, "parent": v.parent, "who": v.who, "created": v.created,
                    "added": len(taught.added), "results": results, "skipped": len(taught.skipped),
                    "references": v.references.get("count"), "threshold": taught.threshold.value,
                    "previous_threshold": taught.previous_threshold, "calibration": v.calibration,
                    "failed": [r.error for r in taught.failed]}

        @api.post("/v1/products/{product}/rollback", summary="Serve an earlier (or later) version of the product",
                  responses=responses(401, 404, 409, 422))
        async def roll_back(product: ProductPath, body: RollbackBody, request: Request):
            problem = self._product_or_404(product)
            if problem is not None:
                return problem
            operator = operator_of(request)
            async with self.changing:
                served = catalog.info(product).version
                try:
                    pointer = await run_in_threadpool(rollback, catalog.bundle, product, body.version, operator, db)
                except UnknownVersion as err:
                    metrics.changes.labels(product, "rollback", "unknown").inc()
                    return error(409, "unknown_version", str(err))
                except BundleError as err:
                    metrics.changes.labels(product, "rollback", "damaged").inc()
                    return error(409, "damaged_version", f"{err} (the served version is unchanged)")
                except WinclipError as err:
                    metrics.changes.labels(product, "rollback", "failed").inc()
                    return error(409, "rollback_failed", str(err))
                problem = await self._serve(product, operator, served if served is not None else pointer["previous"])
                if problem is not None:
                    metrics.changes.labels(product, "rollback", "failed").inc()
                    return problem
            metrics.changes.labels(product, "rollback", "ok").inc()
            return {"product": product, "version": pointer["version"], "previous": pointer["previous"],
                    "who": pointer["who"], "at": pointer["at"]}

        @api.get("/v1/products/{product}/drift", summary="Drift of the product's served version: statistics, alerts",
                 responses=responses(401, 404))
        def drift(product: ProductPath):
            problem = self._product_or_404(product)
            if problem is not None:
                return problem
            state = self.drift.snapshot().get(product) if self.drift is not None else None
            return {"product": product, "watched": state is not None, **(state or {})}

        return api


__all__ = ["ANONYMOUS", "Review", "RollbackBody", "TeachBody", "VerdictBody", "operator_of", "verdict_json"]
