"""Product versions: each teach makes a new, complete, immutable set of a product's few-shot files.

A product's few-shot files (memory, tile memory, tiling setting, threshold) change when an operator teaches it.
Each change is a numbered version folder that is never written again; a small pointer names the live one, so a
switch (teach, rollback) is one atomic rename and a reader sees the old version or the new one, never a mix::

    products/<p>/current.json             the live version (checksummed; absent: the product is unversioned)
    products/<p>/versions/<n>/            memory.npz, tile_memory.npz, tiling.json, threshold.json (those it has)
                                          + version.json: parent, sha256 of each file, references, calibration, who, when
    products/<p>/versions/.staging-*      a version being built (a killed teach's is removed by the next one)
    products/<p>/.versions.lock           serialises teach and rollback, across processes

Without ``current.json`` the files beside ``text.npz`` are the live ones, exactly as before versions existed
(models/README.md). A version is verified whenever it is read: its ``version.json`` by its own sha256 (and by the
one the pointer recorded), every file it lists by sha256, and no versioned file it does not list. A damaged version
is refused by its number, so the loaded one keeps serving.

The loaders of products.py and tiles/memory.py ask :func:`files_dir` where to read and :func:`write_dir` where to
write; a Bundle pinned to a folder (``Bundle.with_product_folder``) reads a version being built, or one version for
a whole load.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .bundle import MEMORY, THRESHOLD, TILE_MEMORY, TILING, Bundle, BundleError, json_with_checksum, read_checked_json
from .fileio import DIR_MODE, atomic_write_json, fsync_dir, sha256_file

POINTER = "current.json"
VERSIONS = "versions"
VERSION_FILE = "version.json"
LOCK_FILE = ".versions.lock"
STAGING = ".staging-"
VERSIONED_FILES = (MEMORY, TILE_MEMORY, TILING, THRESHOLD)
FORMAT = 1  # of version.json and current.json


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Version:
    """One version of a product's few-shot files (``versions/<number>/version.json``)."""

    product: str
    number: int
    parent: int | None  # the version it was made from (None: imported from the unversioned files)
    action: str  # "import" (the files before the first teach) or "teach"
    who: str  # the operator's name (never a token)
    created: str  # UTC ISO 8601
    files: dict  # file name -> sha256 of its bytes
    references: dict = field(default_factory=dict)  # count, added, sha256 (memory order), added_sha256, added_sources
    calibration: dict = field(default_factory=dict)  # method, n_images, target/observed false-alarm rate, threshold
    note: str = ""
    weights_id: str = ""
    sha256: str = ""  # of version.json (the pointer records it)
    folder: Path = Path()

    def to_dict(self) -> dict:
        return {"format": FORMAT, "product": self.product, "version": self.number, "parent": self.parent,
                "action": self.action, "who": self.who, "created": self.created, "files": self.files,
                "references": self.references, "calibration": self.calibration, "note": self.note,
                "weights_id": self.weights_id}


class UnknownVersion(BundleError):
    """A version number the product does not have."""


@dataclass(frozen=True)
class VersionStatus:
    """A listing entry: the version, or why it cannot be served."""

    number: int
    version: Version | None
    error: str | None
    live: bool

    def to_dict(self) -> dict:
        """The listing row of ``product versions --json`` and the versions endpoint."""
        v = self.version
        if v is None:
            return {"version": self.number, "live": self.live, "error": self.error}
        return {"version": v.number, "live": self.live, "parent": v.parent, "action": v.action, "who": v.who,
                "created": v.created, "references": v.references.get("count"), "added": v.references.get("added"),
                "threshold": v.calibration.get("threshold"), "calibration": v.calibration.get("method"),
                "target_false_alarm_rate": v.calibration.get("target_false_alarm_rate"),
                "false_alarm_rate": v.calibration.get("false_alarm_rate"), "note": v.note, "error": None}


# ---------------------------------------------------------------- paths
def versions_dir(bundle: Bundle, product: str) -> Path:
    return bundle.product_dir(product) / VERSIONS


def pointer_path(bundle: Bundle, product: str) -> Path:
    return bundle.product_dir(product) / POINTER


def numbers(bundle: Bundle, product: str) -> list[int]:
    """The version numbers that have a folder (damaged ones included), ascending."""
    folder = versions_dir(bundle, product)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and str(int(p.name)) == p.name)


def _rollback_hint(bundle: Bundle, product: str) -> str:
    return f"`winclip-edge product rollback --bundle {bundle.root} --product {product} --version N`"


def _finish_rename_hint(bundle: Bundle, old: str, new: str) -> str:
    from .bundle import rename_command

    return f"`{rename_command(bundle, old, new)}`"


# ---------------------------------------------------------------- verification
_hashes: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> sha256: a version is read 4 times per load


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _hashes.get(key)
    if digest is None:
        digest = _hashes[key] = sha256_file(path)
    return digest


def load_version(bundle: Bundle, product: str, number: int) -> Version:
    """Version ``number`` of ``product``, verified (see the module docstring); BundleError naming it otherwise."""
    folder = versions_dir(bundle, product) / str(number)
    what = f"version {number} of product {product!r}"
    if not (folder / VERSION_FILE).is_file():
        known = ", ".join(map(str, numbers(bundle, product))) or "none"
        raise UnknownVersion(f"{what} does not exist (versions: {known})")

    def damaged(detail: str) -> BundleError:
        return BundleError(f"{what} is damaged ({detail}); it is not served: roll back to another version with "
                           f"{_rollback_hint(bundle, product)}")

    try:
        obj = read_checked_json(folder / VERSION_FILE)
    except BundleError as err:
        raise damaged(str(err).split(";")[0]) from None
    if obj.get("format") == FORMAT and obj.get("version") == number and isinstance(obj.get("product"), str) \
            and obj["product"] != product:
        raise BundleError(f"{what}: {folder / VERSION_FILE} still names the product {obj['product']!r}; finish its "
                          f"rename with {_finish_rename_hint(bundle, obj['product'], product)}")
    if obj.get("format") != FORMAT or obj.get("product") != product or obj.get("version") != number:
        raise damaged(f"{folder / VERSION_FILE} describes {obj.get('product')!r} version {obj.get('version')}, "
                      f"format {obj.get('format')}")
    if obj.get("weights_id") != bundle.manifest.weights_id:
        raise damaged("made with other model weights than this bundle's")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise damaged("no file list")
    for name in VERSIONED_FILES:
        path = folder / name
        if name not in files:
            if path.exists():
                raise damaged(f"{name} is not one of its files (added after the version was made)")
            continue
        if not path.is_file():
            raise damaged(f"{name} is missing")
        if _file_sha256(path) != files[name]:
            raise damaged(f"{name} fails its sha256 check")
    unknown = sorted(set(files) - set(VERSIONED_FILES))
    if unknown:
        raise damaged(f"lists unknown files {unknown}")
    return Version(product=product, number=number, parent=obj.get("parent"), action=obj.get("action", ""),
                   who=obj.get("who", ""), created=obj.get("created", ""), files=dict(files),
                   references=obj.get("references", {}), calibration=obj.get("calibration", {}),
                   note=obj.get("note", ""), weights_id=obj["weights_id"], sha256=obj["sha256"], folder=folder)


def read_pointer(bundle: Bundle, product: str) -> dict | None:
    """``current.json`` (verified), or None for an unversioned product."""
    path = pointer_path(bundle, product)
    if not path.is_file():
        return None
    obj = read_checked_json(path, f"write it again with {_rollback_hint(bundle, product)}")
    if isinstance(obj.get("product"), str) and obj["product"] != product:
        raise BundleError(f"{path} still names the product {obj['product']!r}; finish its rename with "
                          f"{_finish_rename_hint(bundle, obj['product'], product)}")
    if obj.get("format") != FORMAT or obj.get("product") != product or not isinstance(obj.get("version"), int):
        raise BundleError(f"{path} names no version of {product!r}; write it again with {_rollback_hint(bundle, product)}")
    return obj


def live_version(bundle: Bundle, product: str) -> Version | None:
    """The version the pointer names, verified; None for an unversioned product (its files beside text.npz serve)."""
    pointer = read_pointer(bundle, product)
    if pointer is None:
        return None
    version = load_version(bundle, product, pointer["version"])
    if version.sha256 != pointer.get("version_sha256"):
        raise BundleError(f"version {version.number} of product {product!r} is damaged (its version.json is not the "
                          f"one {POINTER} switched to); it is not served: roll back with {_rollback_hint(bundle, product)}")
    return version


def list_versions(bundle: Bundle, product: str) -> list[VersionStatus]:
    """Every version folder, oldest first, with the reason when one cannot be served (one damaged version never
    hides the others)."""
    bundle.check_product(product)
    try:
        pointer = read_pointer(bundle, product)
    except BundleError:
        pointer = None
    live = None if pointer is None else pointer["version"]
    out = []
    for number in numbers(bundle, product):
        try:
            out.append(VersionStatus(number, load_version(bundle, product, number), None, number == live))
        except BundleError as err:
            out.append(VersionStatus(number, None, str(err), number == live))
    return out


# ---------------------------------------------------------------- where the loaders read and write
def files_dir(bundle: Bundle, product: str) -> Path:
    """The folder ``product``'s few-shot files are read from: the one the Bundle is pinned to, else the live
    version's, else the product folder (unversioned)."""
    pinned = bundle.product_folders.get(product)
    if pinned is not None:
        return pinned
    live = live_version(bundle, product)
    return bundle.product_dir(product) if live is None else live.folder


def write_dir(bundle: Bundle, product: str) -> Path:
    """The folder a few-shot file of ``product`` is written to. A version never changes: writing into one is
    refused, and so is writing beside a versioned product's pointer (the file would not be served)."""
    pinned = bundle.product_folders.get(product)
    if pinned is not None:
        if (pinned / VERSION_FILE).exists():
            raise BundleError(f"{pinned} is a finished version of {product!r}: versions never change; "
                              "`winclip-edge teach` makes a new one")
        return pinned
    pointer = read_pointer(bundle, product)
    if pointer is not None:
        path = pointer_path(bundle, product)
        raise BundleError(
            f"product {product!r} serves version {pointer['version']} ({path}): a file written beside it would not be "
            f"served; add references with `winclip-edge teach`, go back with {_rollback_hint(bundle, product)}, or "
            f"delete {path} to serve the unversioned files again (the versions stay)")
    return bundle.product_dir(product)


def pinned(bundle: Bundle, product: str) -> tuple[Bundle, Version | None]:
    """``bundle`` with ``product`` pinned to its live version, resolved once: everything one load reads comes from
    the same version even if the pointer moves meanwhile. Returns the view and the version (None: unversioned). A
    bundle already pinned for ``product`` is returned as it is, with the version its folder holds (None: a draft)."""
    folder = bundle.product_folders.get(product)
    if folder is not None:
        number = folder.name
        held = folder.parent == versions_dir(bundle, product) and number.isdigit() and (folder / VERSION_FILE).is_file()
        return bundle, load_version(bundle, product, int(number)) if held else None
    live = live_version(bundle, product)
    return (bundle, None) if live is None else (bundle.with_product_folder(product, live.folder), live)


# ---------------------------------------------------------------- making versions
@contextmanager
def lock(bundle: Bundle, product: str) -> Iterator[None]:
    """Exclusive hold on the product's versions (teach, rollback), across processes and threads."""
    import fcntl

    bundle.check_product(product)
    fd = os.open(bundle.product_dir(product) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Draft:
    """A version being built in a staging folder; ``bundle`` reads and writes the product's files there."""

    product: str
    folder: Path
    bundle: Bundle
    parent: Version | None


def _place(src: Path, dst: Path, link: bool) -> None:
    """``src`` into a draft: a hard link where allowed (versions are never written in place, so they may share a
    file), else a copy, fsynced."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def start_draft(bundle: Bundle, product: str, parent: Version | None) -> Draft:
    """A staging folder holding ``parent``'s files (hard links), or copies of the unversioned files when ``parent`` is
    None (they can still be rewritten in place, a version must not be). Call with :func:`lock` held."""
    root = versions_dir(bundle, product)
    root.mkdir(mode=DIR_MODE, exist_ok=True)
    for old in root.glob(STAGING + "*"):  # a killed teach's draft
        shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{STAGING}{uuid.uuid4().hex[:12]}"
    folder.mkdir(mode=DIR_MODE)
    source = bundle.product_dir(product) if parent is None else parent.folder
    for name in (VERSIONED_FILES if parent is None else parent.files):
        if (source / name).is_file():
            _place(source / name, folder / name, link=parent is not None)
    return Draft(product, folder, bundle.with_product_folder(product, folder), parent)


def seal(draft: Draft, who: str, action: str, references: dict | None = None, calibration: dict | None = None,
         note: str = "") -> Version:
    """Finish a draft: version.json with the sha256 of every file, then one rename to ``versions/<n>`` (the next
    number). Call with :func:`lock` held; the pointer is not moved (see :func:`switch`)."""
    bundle, product = draft.bundle, draft.product
    root = versions_dir(bundle, product)
    number = max(numbers(bundle, product), default=0) + 1
    files = {name: sha256_file(draft.folder / name) for name in VERSIONED_FILES if (draft.folder / name).is_file()}
    body = Version(product=product, number=number, parent=None if draft.parent is None else draft.parent.number,
                   action=action, who=who, created=_now(), files=files, references=references or {},
                   calibration=calibration or {}, note=note, weights_id=bundle.manifest.weights_id).to_dict()
    atomic_write_json(draft.folder / VERSION_FILE, json_with_checksum(body))
    fsync_dir(draft.folder)
    target = root / str(number)
    if target.exists():  # only under a broken lock: never replace a version
        raise BundleError(f"{target} exists already; another process is making versions of {product!r} without the lock")
    os.rename(draft.folder, target)
    fsync_dir(root)
    return load_version(bundle, product, number)


def discard(draft: Draft) -> None:
    shutil.rmtree(draft.folder, ignore_errors=True)


def switch(bundle: Bundle, product: str, number: int, who: str, action: str) -> dict:
    """Make version ``number`` live: verified first (a damaged one is refused by number and nothing changes), then
    ``current.json`` written atomically. Returns the new pointer. Call with :func:`lock` held."""
    version = load_version(bundle, product, number)
    try:
        old = read_pointer(bundle, product)
    except BundleError:  # a damaged pointer is what a rollback repairs; its history is lost
        old = None
    history = [] if old is None else list(old.get("history", []))
    at = _now()
    history.append({"version": number, "who": who, "at": at, "action": action})
    body = {"format": FORMAT, "product": product, "version": number, "version_sha256": version.sha256,
            "previous": None if old is None else old["version"], "who": who, "at": at, "action": action,
            "history": history}
    atomic_write_json(pointer_path(bundle, product), json_with_checksum(body))
    return read_pointer(bundle, product)


# ---------------------------------------------------------------- renaming (products.rename_product)
def rename_records(bundle: Bundle, product: str, old: str) -> int:
    """After ``products/<old>`` was renamed to ``products/<product>``: the version records that name ``old``
    (every ``version.json``, then ``current.json`` with the new checksum of the live one) are written again with
    the new name. The versioned files themselves are not touched. Idempotent (a killed rename is finished by
    running it again). Call with the product's :func:`lock` held. Returns the number of records rewritten."""
    rewritten = 0
    for number in numbers(bundle, product):
        path = versions_dir(bundle, product) / str(number) / VERSION_FILE
        try:
            obj = read_checked_json(path)
        except BundleError:
            continue  # a damaged version stays damaged (and is named as such by `product versions`)
        if obj.get("product") == old:
            atomic_write_json(path, json_with_checksum({**obj, "product": product}))
            rewritten += 1
    path = pointer_path(bundle, product)
    if path.is_file():
        obj = read_checked_json(path, f"write it again with {_rollback_hint(bundle, product)}")
        if obj.get("product") == old:
            live = load_version(bundle, product, obj["version"]) if isinstance(obj.get("version"), int) else None
            body = {**obj, "product": product, **({"version_sha256": live.sha256} if live is not None else {})}
            atomic_write_json(path, json_with_checksum(body))
            rewritten += 1
    return rewritten


def records_naming(bundle: Bundle, product: str, old: str) -> bool:
    """Whether a version record of ``product`` still names ``old`` (a rename killed half-way)."""
    paths = [versions_dir(bundle, product) / str(n) / VERSION_FILE for n in numbers(bundle, product)]
    paths.append(pointer_path(bundle, product))
    for path in paths:
        try:
            if path.is_file() and read_checked_json(path).get("product") == old:
                return True
        except BundleError:
            continue
    return False
