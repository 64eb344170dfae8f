"""Teaching and product versions (winclip_edge/teaching.py, versions.py): a taught false alarm becomes a zero-distance
reference and is no longer flagged, rollback restores the previous scores bit for bit, a damaged version is refused
by number while the loaded one keeps serving, a running catalog switches atomically, and the review database feeds
teach from the exact pixels that were inspected."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import Inspector
from winclip_edge.bundle import Bundle, BundleError
from winclip_edge.calibration import calibrate
from winclip_edge.catalog import Catalog
from winclip_edge.contract import PATCH_TOKENS
from winclip_edge.fileio import sha256_file
from winclip_edge.preprocess import read_image, resize_to_model
from winclip_edge.products import load_memory, save_memory, save_threshold
from winclip_edge.registration import register
from winclip_edge.review import ReviewDB, lossless_source
from winclip_edge.scoring import ScoringOptions, association
from winclip_edge.teaching import NothingToTeach, TeachConfig, TeachError, product_versions, rollback, teach, \
    teach_from_review
from winclip_edge import versions

ZERO_SHOT = ScoringOptions(use_memory=False)
DEFECT = (90, 90, 60, 60)


def write(path: Path, image: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture
def product(bundle_copy, tmp_path):
    """bundle_copy's 'widget' registered on 4 goods and calibrated leave-one-out; ``odd`` is a good part the memory
    does not know (a false alarm), ``goods`` 3 more goods that are no references."""
    refs = [write(tmp_path / "refs" / f"g{s}.png", textured_part(seed=s)) for s in range(4)]
    register(Inspector(bundle_copy, "widget", options=ZERO_SHOT, with_threshold=False), refs)
    threshold, _ = calibrate(Inspector(bundle_copy, "widget", with_threshold=False))
    save_threshold(Bundle(bundle_copy), "widget", threshold)
    odd = write(tmp_path / "line" / "odd.png", textured_part(seed=50, defect=DEFECT))
    goods = [write(tmp_path / "line" / f"good{s}.png", textured_part(seed=s)) for s in range(10, 13)]
    return {"bundle": bundle_copy, "refs": refs, "odd": odd, "goods": goods}


def inspect(bundle, path, **kw):
    result = Inspector(bundle, "widget", **kw).inspect([path])[0]
    assert result.error is None
    return result


def patch_distances(bundle, path) -> np.ndarray:
    """The patch associations a(F) of ``path``'s patch tokens to the product's memory (docs/method.md §7.2)."""
    inspector = Inspector(bundle, "widget")
    outputs = inspector.embed(resize_to_model(read_image(path), inspector.model_size)[None])
    memory = inspector.memory.patch_tokens.reshape(-1, inspector.memory.patch_tokens.shape[-1])
    return association(outputs[PATCH_TOKENS], memory)


# ---------------------------------------------------------------- teach and rollback
def test_unversioned_products_keep_their_files_beside_text_npz(product):
    bundle = Bundle(product["bundle"])
    assert versions.files_dir(bundle, "widget") == bundle.product_dir("widget")
    assert versions.live_version(bundle, "widget") is None and product_versions(bundle, "widget") == []
    assert not (bundle.product_dir("widget") / versions.VERSIONS).exists()


def test_teach_makes_the_false_alarm_a_zero_distance_reference_and_rollback_restores_it_bit_for_bit(product):
    bundle, odd = product["bundle"], product["odd"]
    before = inspect(bundle, odd)
    assert before.anomalous, "the test needs a false alarm to teach"
    assert patch_distances(bundle, odd).max() > 1e-3
    root_files = {n: sha256_file(Bundle(bundle).product_dir("widget") / n) for n in ("memory.npz", "threshold.json")}

    taught = teach(bundle, "widget", [odd], "alice", config=TeachConfig(note="false alarms of the night shift"))

    v = taught.version
    assert (v.number, v.parent, v.action, v.who, v.note) == (2, 1, "teach", "alice", "false alarms of the night shift")
    assert v.references["count"] == 5 and v.references["added"] == 1
    assert v.references["added_sha256"] == [sha256_file(odd)] and v.references["sha256"][-1] == sha256_file(odd)
    assert v.calibration["method"] == "leave-one-out" and v.calibration["n_images"] == 5
    assert v.calibration["target_false_alarm_rate"] == 0.0 and v.calibration["false_alarm_rate"] == 0.0
    assert v.calibration["previous_threshold"] == before.threshold == taught.previous_threshold
    first = versions.load_version(Bundle(bundle), "widget", 1)
    assert first.action == "import" and first.parent is None and first.files == root_files  # version 1 = the old files
    after = inspect(bundle, odd)
    assert after.score < before.score and after.anomalous is False and after.threshold == taught.threshold.value
    assert patch_distances(bundle, odd).max() < 1e-6  # it is a reference now: its patches are in the memory
    assert after.score == pytest.approx(after.zero_shot_score / 2, abs=1e-6)  # window distances zero too: V = 0
    live = Inspector(bundle, "widget").threshold  # which threshold decided, without reading the file again
    record = json.loads((v.folder / "threshold.json").read_text())
    assert (live.checksum, live.created) == (record["sha256"], record["created"]) and live.value == after.threshold

    pointer = rollback(bundle, "widget", 1, "bob")
    assert (pointer["version"], pointer["previous"], pointer["who"]) == (1, 2, "bob")
    back = inspect(bundle, odd)
    assert back.score == before.score and back.threshold == before.threshold and back.anomalous is True
    assert np.array_equal(back.anomaly_map, before.anomaly_map)
    rollback(bundle, "widget", 2, "bob")
    again = inspect(bundle, odd)
    assert again.score == after.score and np.array_equal(again.anomaly_map, after.anomaly_map)
    assert [h["action"] for h in versions.read_pointer(Bundle(bundle), "widget")["history"]] == \
        ["teach", "rollback", "rollback"]
    statuses = product_versions(bundle, "widget")
    assert [(s.number, s.live, s.error) for s in statuses] == [(1, False, None), (2, True, None)]


def test_teaching_the_same_image_again_is_nothing_to_teach(product):
    teach(product["bundle"], "widget", [product["odd"]], "alice")
    with pytest.raises(NothingToTeach, match="references already"):
        teach(product["bundle"], "widget", [product["odd"]], "alice")
    assert versions.live_version(Bundle(product["bundle"]), "widget").number == 2


def test_a_jpeg_copy_of_the_false_alarm_is_not_the_same_reference(product, tmp_path):
    """Why the review database keeps the exact pixels: taught from a JPEG re-encode, the original image still has
    non-zero distances to the memory (so it would stay closer to the threshold than it should)."""
    odd = product["odd"]
    jpeg = tmp_path / "odd.jpg"
    cv2.imwrite(str(jpeg), cv2.imread(odd), [cv2.IMWRITE_JPEG_QUALITY, 90])
    teach(product["bundle"], "widget", [str(jpeg)], "alice")
    assert patch_distances(product["bundle"], odd).max() > 1e-4


def test_calibration_on_good_images_that_are_not_references(product):
    bundle = product["bundle"]
    taught = teach(bundle, "widget", [product["odd"]], "alice", calibration_images=product["goods"],
                   config=TeachConfig(target_false_alarm_rate=0.0))
    t = taught.threshold
    assert not t.leave_one_out and t.n_images == 3 and t.sources == [str(p) for p in product["goods"]]
    # (batch 3 in calibration, 1 here: ONNX Runtime's sums differ in the last bits)
    assert t.value == pytest.approx(max(inspect(bundle, g).score for g in product["goods"]), abs=1e-6)
    assert taught.version.calibration["method"] == "images"
    with pytest.raises(TeachError, match="is a reference"):
        teach(bundle, "widget", [product["goods"][0]], "alice", calibration_images=product["goods"])
    assert versions.live_version(Bundle(bundle), "widget").number == 2  # refused: nothing changed


def test_register_beside_a_versioned_product_is_refused_and_removing_the_pointer_serves_the_old_files(product):
    bundle = product["bundle"]
    before = inspect(bundle, product["odd"])
    teach(bundle, "widget", [product["odd"]], "alice")
    b = Bundle(bundle)
    with pytest.raises(BundleError, match="serves version 2 .*`winclip-edge teach`"):
        save_memory(b, "widget", load_memory(b, "widget"))
    with pytest.raises(BundleError, match="versions never change"):
        save_memory(b.with_product_folder("widget", versions.versions_dir(b, "widget") / "2"), "widget",
                    load_memory(b, "widget"))
    versions.pointer_path(b, "widget").unlink()
    assert inspect(bundle, product["odd"]).score == before.score


def test_an_interrupted_teach_changes_nothing_and_its_import_is_used_again(product, monkeypatch):
    import winclip_edge.teaching as teaching

    bundle = Bundle(product["bundle"])
    before = inspect(bundle, product["odd"])

    def broken(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(teaching, "calibrate", broken)
    with pytest.raises(RuntimeError, match="power cut"):
        teach(bundle, "widget", [product["odd"]], "alice")
    assert versions.read_pointer(bundle, "widget") is None  # still unversioned: register/calibrate still work
    assert not list(versions.versions_dir(bundle, "widget").glob(versions.STAGING + "*"))
    assert inspect(bundle, product["odd"]).score == before.score
    monkeypatch.undo()
    (versions.versions_dir(bundle, "widget") / f"{versions.STAGING}killed").mkdir()  # as a SIGKILLed teach leaves it
    taught = teach(bundle, "widget", [product["odd"]], "alice")
    assert taught.version.number == 2 and taught.version.parent == 1  # the import of the first try, reused
    assert versions.numbers(bundle, "widget") == [1, 2]
    assert not list(versions.versions_dir(bundle, "widget").glob(versions.STAGING + "*"))


# ---------------------------------------------------------------- damaged versions
def test_a_damaged_version_is_refused_by_number_and_the_loaded_one_keeps_serving(product):
    bundle = product["bundle"]
    teach(bundle, "widget", [product["odd"]], "alice")
    catalog = Catalog(bundle, ["widget"])
    serving = catalog.get("widget")
    v2 = serving.inspect([product["odd"]])[0].score
    teach(bundle, "widget", [product["goods"][0]], "alice", engine=catalog.engine)  # version 3 is live on disk
    memory = versions.versions_dir(Bundle(bundle), "widget") / "3" / "memory.npz"
    data = bytearray(memory.read_bytes())
    data[len(data) // 2] ^= 0xFF
    memory.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=r"version 3 of product 'widget' is damaged \(memory.npz fails its sha256"):
        catalog.reload("widget")
    assert catalog.get("widget") is serving and serving.inspect([product["odd"]])[0].score == v2
    with pytest.raises(BundleError, match="version 3 of product 'widget' is damaged"):
        Catalog(bundle, ["widget"])  # a fresh station does not silently serve another version
    rollback(bundle, "widget", 2, "bob")
    assert catalog.reload("widget").inspect([product["odd"]])[0].score == v2
    with pytest.raises(BundleError, match="version 3 of product 'widget' is damaged"):
        rollback(bundle, "widget", 3, "bob")
    assert versions.read_pointer(Bundle(bundle), "widget")["version"] == 2  # refused: the pointer did not move
    statuses = {s.number: s for s in product_versions(bundle, "widget")}
    assert statuses[2].live and statuses[3].version is None and "memory.npz fails" in statuses[3].error
    with pytest.raises(versions.UnknownVersion, match="version 7 of product .widget. does not exist"):
        rollback(bundle, "widget", 7, "bob")
    catalog.close()


@pytest.mark.parametrize("damage", ["edit version.json", "extra file", "missing file", "swap version.json"])
def test_every_kind_of_damage_is_refused(product, damage):
    bundle = Bundle(product["bundle"])
    teach(bundle, "widget", [product["odd"]], "alice")
    folder = versions.versions_dir(bundle, "widget") / "2"
    if damage == "edit version.json":
        obj = json.loads((folder / "version.json").read_text())
        obj["who"] = "mallory"
        (folder / "version.json").write_text(json.dumps(obj))
    elif damage == "extra file":
        (folder / "tiling.json").write_text("{}")
    elif damage == "missing file":
        (folder / "threshold.json").unlink()
    else:  # another valid version.json (version 1's, renumbered): the pointer's sha256 catches it
        other = json.loads((folder.parent / "1" / "version.json").read_text())
        from winclip_edge.bundle import json_with_checksum

        other.update(version=2)
        (folder / "version.json").write_text(json.dumps(json_with_checksum(other)))
    with pytest.raises(BundleError, match="version 2 of product 'widget' is damaged"):
        Inspector(bundle, "widget")


def test_pinned_reads_one_version_even_when_the_pointer_moves(product):
    bundle = Bundle(product["bundle"])
    teach(bundle, "widget", [product["odd"]], "alice")
    view, live = versions.pinned(bundle, "widget")
    rollback(bundle, "widget", 1, "bob")
    assert live.number == 2 and load_memory(view, "widget").size == 5 and load_memory(bundle, "widget").size == 4


# ---------------------------------------------------------------- a running station
def test_a_running_catalog_switches_atomically_no_frame_lost_or_half_switched(product):
    bundle, odd = product["bundle"], product["odd"]
    old = inspect(bundle, odd)
    catalog = Catalog(bundle, ["widget"])
    seen, stop, errors = [], threading.Event(), []

    def line():
        while not stop.is_set():
            try:
                r = catalog.get("widget").inspect([odd])[0]
                seen.append((r.score, r.threshold, r.anomalous))
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

    workers = [threading.Thread(target=line) for _ in range(2)]
    for w in workers:
        w.start()
    taught = teach(bundle, "widget", [odd], "alice", engine=catalog.engine, options=catalog.options)
    catalog.reload("widget")
    new = catalog.get("widget").inspect([odd])[0]
    n_before_stop = len(seen)
    while len(seen) < n_before_stop + 4:  # a few more frames after the switch
        time.sleep(0.01)
    stop.set()
    for w in workers:
        w.join()
    assert not errors and new.threshold == taught.threshold.value
    outcomes = set(seen)
    assert outcomes <= {(old.score, old.threshold, True), (new.score, new.threshold, False)}, outcomes
    assert (new.score, new.threshold, False) in outcomes and seen[-1] == (new.score, new.threshold, False)
    catalog.close()


# ---------------------------------------------------------------- from the review database
def test_teach_from_review_uses_the_exact_pixels_and_records_what_was_taught(product, tmp_path):
    from winclip_edge.service.store import ResultStore

    bundle, odd = product["bundle"], product["odd"]
    store, db = ResultStore(tmp_path / "review"), ReviewDB(tmp_path / "review" / "verdicts.sqlite")
    inspector = Inspector(bundle, "widget")
    ids = {}
    for name, path in (("odd", odd), ("good", product["goods"][0]), ("bad", product["goods"][1])):
        r = inspector.inspect([read_image(path)], keep_images=True)[0]  # as a camera frame: pixels, no file
        ids[name] = store.add({"id": f"{len(ids) + 1:032x}", "product": "widget", "anomalous": r.anomalous,
                               "score": r.score, "threshold": r.threshold, "file": None}, r)
    assert store.get(ids["odd"])["anomalous"] and not store.get(ids["good"])["anomalous"]
    for name, verdict, who in (("odd", "good", "alice"), ("good", "good", "bob"), ("bad", "defect", "bob")):
        record = store.get(ids[name])
        db.record(ids[name], "widget", verdict, who, score=record["score"], threshold=record["threshold"],
                  anomalous=record["anomalous"], version=None,
                  image=lossless_source(record, store.file(ids[name], "original")))
    assert [v.result_id for v in db.teachable("widget")] == [ids["odd"]]  # the false alarm only

    taught = teach_from_review(db, bundle, "widget", "alice")

    assert taught.version.number == 2 and db.teachable("widget") == []
    assert [t["result_id"] for t in db.taught("widget")] == [ids["odd"]] and db.taught("widget")[0]["version"] == 2
    (event,) = db.events("widget")
    assert (event["action"], event["operator"], event["version"]) == ("teach", "alice", 2)
    assert event["detail"]["results"] == [ids["odd"]]
    assert patch_distances(bundle, odd).max() < 1e-6  # taught from the kept PNG = the inspected pixels
    assert inspect(bundle, odd).anomalous is False
    with pytest.raises(NothingToTeach):
        teach_from_review(db, bundle, "widget", "alice")
    rollback(bundle, "widget", 1, "bob", review=db)
    assert db.events("widget")[0]["action"] == "rollback" and db.teachable("widget") == []  # not taught again


def test_teach_from_review_records_a_teach_that_was_cut_off_before_it_was_recorded(product, tmp_path):
    bundle, odd = product["bundle"], product["odd"]
    db = ReviewDB(tmp_path / "verdicts.sqlite")
    db.record("a" * 32, "widget", "good", "alice", anomalous=True, image=read_image(odd))
    kept = db.teachable("widget")[0].image
    teach(bundle, "widget", [kept], "alice")  # as if teach_from_review died after the switch
    with pytest.raises(NothingToTeach):
        teach_from_review(db, bundle, "widget", "alice")
    assert db.taught("widget")[0]["version"] == 2 and versions.numbers(Bundle(bundle), "widget") == [1, 2]


# ---------------------------------------------------------------- tiled products
def test_a_tiled_product_is_taught_per_tile(bundle_copy, tmp_path):
    from winclip_edge.tiles.memory import load_tile_memory
    from winclip_edge.tiles.tiling import TilingConfig

    size = (240, 480)
    refs = [write(tmp_path / f"r{s}.png", textured_part(size, seed=s)) for s in range(3)]
    tiling = TilingConfig(tile=240, overlap=0.0)
    register(Inspector(bundle_copy, "widget", options=ZERO_SHOT, with_threshold=False, tiling=tiling, roi=None), refs)
    threshold, _ = calibrate(Inspector(bundle_copy, "widget", with_threshold=False))
    save_threshold(Bundle(bundle_copy), "widget", threshold)
    odd = write(tmp_path / "odd.png", textured_part(size, seed=60, defect=(100, 300, 60, 60)))
    before = inspect(bundle_copy, odd)
    assert before.anomalous and before.units > 1
    tiles_before = load_tile_memory(Bundle(bundle_copy), "widget", load_memory(Bundle(bundle_copy), "widget").source_sha256)

    taught = teach(bundle_copy, "widget", [odd], "alice")

    assert set(taught.version.files) == {"memory.npz", "tile_memory.npz", "tiling.json", "threshold.json"}
    b = Bundle(bundle_copy)
    tiles = load_tile_memory(b, "widget", load_memory(b, "widget").source_sha256)
    assert tiles.size == 4 and len(tiles.position) == len(tiles_before.position) * 4 // 3
    after = inspect(bundle_copy, odd)
    assert after.score < before.score and after.anomalous is False and after.units == before.units
    rollback(bundle_copy, "widget", 1, "bob")
    assert inspect(bundle_copy, odd).score == before.score


# ---------------------------------------------------------------- the command line
def test_cli_teach_versions_and_rollback(product, tmp_path, capsys):
    from winclip_edge.cli import main

    bundle = str(product["bundle"])
    assert main(["teach", "--bundle", bundle, "--product", "widget", "--operator", "carol", "--quiet",
                 product["odd"]]) == 0
    out = capsys.readouterr().out
    assert "'widget' version 2 (from 1) is live: 1 reference(s) added (5 in all)" in out
    assert main(["product", "versions", "--bundle", bundle, "--product", "widget", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["versions"]
    assert [(r["version"], r["live"], r["who"], r["action"]) for r in rows] == [(1, False, "carol", "import"),
                                                                                (2, True, "carol", "teach")]
    assert main(["product", "rollback", "--bundle", bundle, "--product", "widget", "--version", "1",
                 "--operator", "dave", "--review", str(tmp_path / "r.sqlite")]) == 0
    assert "version 1 is live (was 2)" in capsys.readouterr().out
    assert ReviewDB(tmp_path / "r.sqlite").events()[0]["operator"] == "dave"
    assert main(["product", "versions", "--bundle", bundle, "--product", "widget"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("*    1  import") and listing[1].startswith("     2  teach")
    assert main(["product", "rollback", "--bundle", bundle, "--product", "widget", "--version", "9"]) == 2
    assert "version 9 of product 'widget' does not exist" in capsys.readouterr().err
    assert main(["teach", "--bundle", bundle, "--product", "widget", "--quiet", "--review",
                 str(tmp_path / "r.sqlite")]) == 0
    assert "no good verdict of 'widget' to teach" in capsys.readouterr().err
    assert main(["teach", "--bundle", bundle, "--product", "widget"]) == 2
