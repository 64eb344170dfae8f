"""Teaching: images an operator judged good become few-shot references and a re-calibrated threshold, as a new
product version (winclip_edge/versions.py); rollback makes any earlier version live again.

A false alarm on a good part is exactly the reference the few-shot memory lacks. ``teach`` appends the images the
way ``register --append`` does (the same call: tiled products get every tile of them), re-calibrates the threshold
on good images that are not references, or leave-one-out over the new memory when none are given, and writes it
all as a new version. The version is built in a staging folder, loaded once as a station would load it (the
threshold must belong to the memory and the scoring options), and only then does the pointer move: one atomic
write. A station picks it up with ``Catalog.reload``, which swaps the product's Inspector in one step.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .bundle import MEMORY, Bundle, BundleError
from .calibration import DEFAULT_FALSE_ALARM_RATE, calibrate
from .engines import Engine, EngineConfig, create_engine
from .errors import WinclipError
from .fileio import sha256_file
from .inspector import DEFAULT_BATCH, ImageInput, InspectionResult, Inspector
from .products import Memory, Threshold, load_memory, load_threshold, save_threshold
from .registration import register
from .review import ReviewDB, Verdict
from .scoring import ScoringOptions
from . import versions as _versions
from .versions import Version, VersionStatus


class TeachError(WinclipError, ValueError):
    """Teaching cannot go ahead (unusable product files, calibration images that are references ...)."""


class NothingToTeach(TeachError):
    """No new good image: every one given is a reference already (or none was given)."""


@dataclass(frozen=True)
class TeachConfig:
    """How a version is made from good images."""

    target_false_alarm_rate: float | None = None  # None: the live threshold's target (else calibrate's default, 0)
    batch_size: int = DEFAULT_BATCH
    flagged_only: bool = True  # teach_from_review: only false alarms (flagged, judged good), not every good verdict
    note: str = ""  # kept in version.json


@dataclass
class Taught:
    """What a teach made."""

    version: Version
    threshold: Threshold
    previous_threshold: float | None
    added: list[str]  # the images that became references
    skipped: list[str] = field(default_factory=list)  # references already (same sha256)
    failed: list[InspectionResult] = field(default_factory=list)  # unreadable references or calibration images


def _calibration_record(threshold: Threshold | None, previous: float | None = None, failed: int = 0) -> dict:
    if threshold is None:
        return {}
    return {"method": "leave-one-out" if threshold.leave_one_out else "images", "n_images": threshold.n_images,
            "target_false_alarm_rate": threshold.target_false_alarm_rate,
            "false_alarm_rate": threshold.false_alarm_rate, "threshold": threshold.value, "mode": threshold.mode,
            "previous_threshold": previous, "failed": failed}


def _reference_record(memory: Memory | None, added: Sequence[str] = (), added_sha256: Sequence[str] = (),
                      skipped: int = 0) -> dict:
    return {"count": 0 if memory is None else memory.size, "sha256": [] if memory is None else list(memory.source_sha256),
            "added": len(added), "added_sha256": list(added_sha256), "added_sources": list(added), "skipped": skipped}


def _import_unversioned(bundle: Bundle, product: str, who: str) -> Version:
    """The product's files before its first teach as a version (parent None): the unversioned files are checked
    first, and an import of exactly these files made by an earlier, interrupted teach is used again."""
    folder = bundle.product_dir(product)
    try:
        memory = load_memory(bundle, product)
        threshold = load_threshold(bundle, product, memory)
    except BundleError as err:
        raise TeachError(f"the files of product {product!r} cannot be loaded, so they cannot be taught: {err}") from None
    present = {name: sha256_file(folder / name) for name in _versions.VERSIONED_FILES if (folder / name).is_file()}
    for status in reversed(_versions.list_versions(bundle, product)):
        v = status.version
        if v is not None and v.action == "import" and v.files == present:
            return v
    draft = _versions.start_draft(bundle, product, None)
    try:
        return _versions.seal(draft, who, "import", _reference_record(memory), _calibration_record(threshold),
                              note="the product's files before its first teach")
    except BaseException:
        _versions.discard(draft)
        raise


def _hashes(items: Sequence[ImageInput]) -> tuple[list[tuple[ImageInput, str]], list[InspectionResult]]:
    """(image, sha256 of its file) for paths that can be read; arrays get "" (they cannot be recognised again)."""
    out, failed = [], []
    for item in items:
        if isinstance(item, (str, Path)):
            try:
                out.append((item, sha256_file(item)))
            except OSError as err:
                failed.append(InspectionResult(path=str(item), error=f"{item}: cannot be read ({err.strerror or err})"))
        else:
            out.append((item, ""))
    return out, failed


def teach(bundle: str | Path | Bundle, product: str, images: Sequence[ImageInput], who: str, *,
          calibration_images: Sequence[ImageInput] = (), config: TeachConfig = TeachConfig(),
          engine: EngineConfig | Engine = EngineConfig(), options: ScoringOptions = ScoringOptions(),
          progress: Any = None) -> Taught:
    """Append the good ``images`` to ``product``'s references, re-calibrate, and make the result the live version
    (see the module docstring). ``calibration_images``: good images that are not references (default:
    leave-one-out over the new memory). ``engine``: an engine to share (a station's ``catalog.engine``) or one to
    make. ``options`` must be the station's scoring options: the threshold records them."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    bundle.check_product(product)
    if not isinstance(who, str) or not who.strip():
        raise TeachError("teach needs the name of who teaches (it is recorded in the version)")
    items, failed = _hashes(list(images))
    made = create_engine(bundle, engine) if isinstance(engine, EngineConfig) else engine
    try:
        with _versions.lock(bundle, product):
            live = _versions.live_version(bundle, product)
            parent = live or _import_unversioned(bundle, product, who)
            view = bundle.with_product_folder(product, parent.folder)
            old_memory = load_memory(view, product) if MEMORY in parent.files else None
            try:
                old_threshold = load_threshold(view, product, old_memory)
            except BundleError:  # a live threshold that does not fit is replaced anyway; its value is only recorded
                old_threshold = None
            known = set(old_memory.source_sha256) if old_memory is not None else set()
            new, skipped = [], []
            for item, digest in items:
                if digest and digest in known:
                    skipped.append(str(item))
                    continue
                if digest:
                    known.add(digest)
                new.append(item)
            if not new:
                raise NothingToTeach(f"nothing new to teach {product!r}: " + (
                    f"all {len(skipped)} image(s) are references already" if skipped else "no readable image given"))
            target = config.target_false_alarm_rate
            if target is None:
                target = old_threshold.target_false_alarm_rate if old_threshold is not None else DEFAULT_FALSE_ALARM_RATE
            version, threshold, added, more_failed = _build(bundle, product, parent, made, new, list(calibration_images),
                                                            target, old_threshold, skipped, who, config, options,
                                                            progress)
            _versions.switch(bundle, product, version.number, who, "teach")
    finally:
        if made is not engine:
            made.close()
    return Taught(version=version, threshold=threshold,
                  previous_threshold=None if old_threshold is None else old_threshold.value, added=added,
                  skipped=skipped, failed=failed + more_failed)


def _build(bundle: Bundle, product: str, parent: Version, engine: Engine, new: list, calibration_images: list,
           target: float, old_threshold: Threshold | None, skipped: list[str], who: str, config: TeachConfig,
           options: ScoringOptions, progress: Any) -> tuple[Version, Threshold, list[str], list[InspectionResult]]:
    """The new version, sealed (the pointer is not moved); the staging folder is removed on any error."""
    draft = _versions.start_draft(bundle, product, parent)
    try:
        references = Inspector(draft.bundle, product, engine=engine, options=replace(options, use_memory=False),
                               with_threshold=False)
        memory, failed = register(references, new, config.batch_size, append=True, progress=progress)
        added_count = len(new) - len(failed)
        added_sha = memory.source_sha256[memory.size - added_count:]
        added = memory.sources[memory.size - added_count:]
        reference_hashes = set(h for h in memory.source_sha256 if h)
        for item, digest in _hashes(calibration_images)[0]:
            if digest in reference_hashes:
                raise TeachError(f"calibration image {item} is a reference of {product!r}: calibrate on good images "
                                 "that are not references (or on none: leave-one-out)")
        scorer = Inspector(draft.bundle, product, engine=engine, options=options, with_threshold=False)
        threshold, cal_failed = calibrate(scorer, calibration_images, target, config.batch_size)
        save_threshold(draft.bundle, product, threshold)
        Inspector(draft.bundle, product, engine=engine, options=options)  # loads as the station will, or raises
        version = _versions.seal(
            draft, who, "teach", _reference_record(memory, added, added_sha, len(skipped)),
            _calibration_record(threshold, None if old_threshold is None else old_threshold.value, len(cal_failed)),
            note=config.note)
    except BaseException:
        _versions.discard(draft)
        raise
    return version, threshold, added, failed + cal_failed


def teach_from_review(review: ReviewDB, bundle: str | Path | Bundle, product: str, who: str, *,
                      calibration_images: Sequence[ImageInput] = (), config: TeachConfig = TeachConfig(),
                      engine: EngineConfig | Engine = EngineConfig(), options: ScoringOptions = ScoringOptions(),
                      progress: Any = None) -> Taught:
    """Teach ``product`` the good verdicts of ``review`` that were never taught (false alarms by default), from the
    lossless images the database kept; records which version each went into and audits the teach."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    picks = review.teachable(product, flagged_only=config.flagged_only)
    view, live = _versions.pinned(bundle, product)
    live_memory = load_memory(view, product)
    if live is not None and live_memory is not None:  # taught, but the teach was cut off before it was recorded
        known = set(live_memory.source_sha256)
        review.mark_taught(product, live.number, [v for v in picks if v.image_sha256 in known])
        picks = [v for v in picks if v.image_sha256 not in known]
    usable: list[Verdict] = []
    failed: list[InspectionResult] = []
    for v in picks:
        path = Path(v.image)
        if not path.is_file() or sha256_file(path) != v.image_sha256:
            failed.append(InspectionResult(path=str(path), error=f"the kept image of result {v.result_id} is missing "
                                                                 f"or damaged ({path}); it is not taught"))
        else:
            usable.append(v)
    if not usable:
        raise NothingToTeach(f"no good verdict of {product!r} to teach" + (f" ({len(failed)} kept image(s) damaged)"
                                                                           if failed else ""))
    taught = teach(bundle, product, [v.image for v in usable], who, calibration_images=calibration_images,
                   config=config, engine=engine, options=options, progress=progress)
    into = set(taught.version.references.get("sha256", []))
    review.mark_taught(product, taught.version.number, [v for v in usable if v.image_sha256 in into])
    review.audit("teach", product, who, taught.version.number, {
        "parent": taught.version.parent, "results": [v.result_id for v in usable if v.image_sha256 in into],
        "threshold": taught.threshold.value, "previous_threshold": taught.previous_threshold,
        "calibration": taught.version.calibration, "failed": [r.error for r in failed + taught.failed]})
    taught.failed = failed + taught.failed
    return taught


def rollback(bundle: str | Path | Bundle, product: str, version: int, who: str,
             review: ReviewDB | None = None) -> dict:
    """Make ``version`` live again (verified first: a damaged one is refused by number and nothing changes).
    Returns the new pointer (``current.json``); audited in ``review`` when given."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    if not isinstance(who, str) or not who.strip():
        raise TeachError("rollback needs the name of who rolls back")
    with _versions.lock(bundle, product):
        pointer = _versions.switch(bundle, product, int(version), who, "rollback")
    if review is not None:
        review.audit("rollback", product, who, pointer["version"], {"previous": pointer["previous"]})
    return pointer


def product_versions(bundle: str | Path | Bundle, product: str) -> list[VersionStatus]:
    """Every version of ``product``, oldest first, the live one marked, damaged ones with the reason."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    return _versions.list_versions(bundle, product)
