"""The review database (verdicts, taught images, audit) and named tokens: concurrent writers from threads and
processes, a writer killed mid-write, schema versions, and the token file / variable / middleware."""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.preprocess import read_image
from winclip_edge.review import ReviewDB, ReviewError, lossless_source
from winclip_edge.service.auth import TokenAuth, identify, load_token_file, parse_tokens, tokens_from_env
from winclip_edge.service.config import ServiceError

ROOT = Path(__file__).resolve().parents[1]
TOKEN_FILE = "# operators of line 3\nalice:tok-alice-7f3a\n\nbob : tok-bob-91c2 \n"


def rid(i: int, prefix: str = "") -> str:
    return f"{prefix}{i:032x}"[-32:]


# ---------------------------------------------------------------- the database
def test_verdicts_count_the_newest_per_result_and_keep_the_history(tmp_path):
    db = ReviewDB(tmp_path / "review.sqlite")
    a, b, c = rid(1), rid(2), rid(3)
    first = db.record(a, "widget", "defect", "alice", "scratch?", score=0.7, threshold=0.6, anomalous=True, version=1)
    db.record(a, "widget", "good", "bob", "no, dust", score=0.7, threshold=0.6, anomalous=True, version=1,
              image=textured_part(seed=1))
    db.record(b, "widget", "defect", "alice", score=0.3, threshold=0.6, anomalous=False)  # a miss
    db.record(c, "gadget", "good", "alice", score=0.1, threshold=0.6, anomalous=False)
    assert db.latest(a).verdict == "good" and db.latest(a).operator == "bob" and db.latest(a).note == "no, dust"
    assert [v.verdict for v in db.history(a)] == ["defect", "good"] and db.history(a)[0] == first
    assert db.counts("widget") == {"reviewed": 2, "good": 1, "defect": 1, "false_alarms": 1, "misses": 1, "taught": 0}
    assert db.counts()["reviewed"] == 3
    assert db.unreviewed([rid(9), a, c, rid(8)]) == [rid(9), rid(8)]
    assert [v.result_id for v in db.teachable("widget")] == [a]  # the false alarm with its image
    assert db.teachable("gadget") == [] and len(db.teachable("gadget", flagged_only=False)) == 0  # no image kept
    # the kept image is the exact pixels (PNG), not the store's JPEG
    assert np.array_equal(read_image(db.latest(a).image), textured_part(seed=1))
    db.mark_taught("widget", 2, db.teachable("widget"))
    assert db.teachable("widget") == [] and db.counts("widget")["taught"] == 1
    db.audit("teach", "widget", "bob", 2, {"parent": 1})
    assert db.events("widget")[0]["detail"] == {"parent": 1} and db.events("widget")[0]["operator"] == "bob"
    db.close()
    again = ReviewDB(tmp_path / "review.sqlite")  # reopened: everything is there
    assert again.counts("widget")["taught"] == 1 and again.integrity() == "ok"


@pytest.mark.parametrize("bad", [dict(verdict="fine"), dict(operator=""), dict(operator="alice bob"),
                                 dict(result_id="../x"), dict(note="x" * 2001), dict(product="")])
def test_bad_verdicts_are_refused_with_what_is_wrong(tmp_path, bad):
    db = ReviewDB(tmp_path / "review.sqlite")
    args = {"result_id": rid(1), "product": "widget", "verdict": "good", "operator": "alice", "note": "", **bad}
    with pytest.raises(ReviewError):
        db.record(**args)
    assert db.counts()["reviewed"] == 0


def test_a_newer_schema_or_a_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "review.sqlite"
    ReviewDB(path).close()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(ReviewError, match="schema 99, newer"):
        ReviewDB(path)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(ReviewError, match="something else"):
        ReviewDB(other)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ReviewError, match="not a usable review database"):
        ReviewDB(tmp_path / "junk.sqlite")


def test_the_database_is_in_wal_mode_with_full_sync(tmp_path):
    db = ReviewDB(tmp_path / "review.sqlite")
    assert db._rows("PRAGMA journal_mode")[0][0] == "wal"
    assert db._rows("PRAGMA synchronous")[0][0] == 2  # FULL


_WRITER = textwrap.dedent("""
    import sys
    from winclip_edge.review import ReviewDB
    from winclip_edge.service.auth import identify, load_token_file
    path, token_file, token, first, count = sys.argv[1:6]
    name = identify(load_token_file(token_file), token.encode())
    db = ReviewDB(path)
    for i in range(int(first), int(first) + int(count)):
        v = db.record(f"{i:032x}", "widget", "good" if i % 2 else "defect", name, f"note {i}", score=i / 1000)
        print(v.seq, flush=True)  # acknowledged: the verdict is committed
""")


def test_two_named_tokens_give_verdicts_concurrently_from_threads_and_processes(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN_FILE)
    tokens = load_token_file(token_file)
    path = tmp_path / "review.sqlite"
    ReviewDB(path).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(token_file), token, str(first), "40"],
                              stdout=subprocess.PIPE, text=True, env=env)
             for token, first in (("tok-alice-7f3a", 0), ("tok-bob-91c2", 1000))]
    db = ReviewDB(path)
    acknowledged, errors = [], []

    def thread_writer(token: str, first: int) -> None:
        try:
            name = identify(tokens, token.encode())
            for i in range(first, first + 40):
                acknowledged.append(db.record(rid(i), "widget", "good", name, score=0.5).seq)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=thread_writer, args=a) for a in (("tok-alice-7f3a", 2000), ("tok-bob-91c2", 3000))]
    for t in threads:
        t.start()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for t in threads:
        t.join()
    assert not errors and all(p.returncode == 0 for p in procs)
    acknowledged += [int(line) for out in outputs for line in out.split()]
    rows = db.verdicts(all_rows=True)
    assert len(rows) == 160 and sorted(v.seq for v in rows) == sorted(acknowledged)
    by = {name: sorted(int(v.result_id, 16) for v in rows if v.operator == name) for name in ("alice", "bob")}
    assert by["alice"] == list(range(0, 40)) + list(range(2000, 2040))
    assert by["bob"] == list(range(1000, 1040)) + list(range(3000, 3040))
    assert not [v for v in rows if "tok-" in v.operator + v.note]  # the names are kept, never the tokens
    assert db.integrity() == "ok"


def test_every_acknowledged_verdict_survives_a_sigkill_mid_write(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN_FILE)
    path = tmp_path / "review.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt, kill_after in enumerate((1, 37, 120)):
        first = 10_000 * (attempt + 1)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(token_file), "tok-alice-7f3a",
                                 str(first), "100000"], stdout=subprocess.PIPE, text=True, env=env)
        acknowledged = [int(proc.stdout.readline()) for _ in range(kill_after)]
        os.kill(proc.pid, signal.SIGKILL)  # while it writes the next ones
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        acknowledged += [int(line) for line in proc.stdout.read().split()]  # printed before the kill landed
        db = ReviewDB(path)
        assert db.integrity() == "ok"
        stored = {v.seq: v for v in db.verdicts(all_rows=True)}
        assert set(acknowledged) <= set(stored), "an acknowledged verdict was lost"
        assert all(stored[s].operator == "alice" for s in acknowledged)
        db.close()


def test_lossless_source_prefers_the_kept_png_then_an_unchanged_source_file(tmp_path):
    from winclip_edge.fileio import sha256_file

    kept = tmp_path / "x.original.png"
    kept.write_bytes(b"png")
    source = tmp_path / "part.bmp"
    source.write_bytes(b"bmp")
    record = {"file": str(source), "file_sha256": sha256_file(source)}
    assert lossless_source(record, kept) == kept
    assert lossless_source(record, tmp_path / "gone.png") == source
    source.write_bytes(b"changed since")
    assert lossless_source(record, None) is None
    assert lossless_source({"file": None}, None) is None


def test_the_store_keeps_the_exact_pixels_of_flagged_results_only(tmp_path):
    from winclip_edge.inspector import InspectionResult
    from winclip_edge.service.store import ResultStore

    store = ResultStore(tmp_path / "review", capacity=1)
    image = textured_part(seed=4)
    result = InspectionResult(path="a", score=0.9, anomalous=True, threshold=0.5,
                              anomaly_map=np.zeros((240, 240), np.float32), image=image)
    flagged = store.add({"id": rid(1), "anomalous": True}, result)
    assert np.array_equal(read_image(store.file(flagged, "original")), image)  # the JPEG would not be
    assert not np.array_equal(read_image(store.file(flagged, "image")), image)
    passed = store.add({"id": rid(2), "anomalous": False}, result)
    assert store.file(passed, "original") is None and store.file(passed, "image") is not None
    assert not (tmp_path / "review" / f"{rid(1)}.original.png").exists()  # evicted with its result


# ---------------------------------------------------------------- named tokens
def test_token_file_lines_have_names_and_bad_files_are_refused_without_showing_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    tokens = load_token_file(path)
    assert [t.name for t in tokens] == ["alice", "bob"] and "tok-" not in repr(tokens)
    assert identify(tokens, b"tok-bob-91c2") == "bob" and identify(tokens, b"tok-alice-7f3a") == "alice"
    assert identify(tokens, b"tok-bob-91c") is None and identify(tokens, None) is None and identify(tokens, b"") is None
    assert identify(parse_tokens("line:a:b:c", "t"), b"a:b:c") == "line"  # a token may hold ':'
    for text, message in [("alice", "expected name:token"), ("alice:", "expected name:token"),
                          ("a b:x", "invalid name"), ("alice:x\nalice:y", "given twice"),
                          ("alice:same\nbob:same", "same token as 'alice'"), ("# only comments\n", "names no token")]:
        with pytest.raises(ServiceError, match=message) as info:
            parse_tokens(text, "token file t")
        assert "same" not in str(info.value).replace("same token", "") and ":y" not in str(info.value)
    with pytest.raises(ServiceError, match="cannot be read"):
        load_token_file(tmp_path / "missing")


def test_tokens_from_the_environment():
    assert tokens_from_env({}) == ()
    tokens = tokens_from_env({"WINCLIP_TOKENS": "alice:t1, bob:t2\ncarol:t3"})
    assert [(t.name, t.token) for t in tokens] == [("alice", "t1"), ("bob", "t2"), ("carol", "t3")]


def _call(auth: TokenAuth, headers: list[tuple[bytes, bytes]], path: str = "/v1/results") -> tuple[int, dict]:
    seen, sent = {}, []

    async def app(scope, receive, send):
        seen.update(scope.get("state", {}))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        sent.append(message)

    auth.app = app
    asyncio.run(auth({"type": "http", "path": path, "method": "POST", "headers": headers}, None, send))
    return sent[0]["status"], seen


def test_the_middleware_names_the_operator_of_the_token():
    auth = TokenAuth(None, token="legacy-token", tokens=parse_tokens(TOKEN_FILE, "t"))
    assert _call(auth, [(b"authorization", b"Bearer tok-bob-91c2")]) == (200, {"operator": "bob"})
    assert _call(auth, [(b"cookie", b"winclip_token=tok-alice-7f3a")]) == (200, {"operator": "alice"})
    assert _call(auth, [(b"authorization", b"Bearer legacy-token")]) == (200, {"operator": "default"})
    assert _call(auth, [(b"authorization", b"Bearer tok-bob")])[0] == 401
    assert _call(auth, [])[0] == 401
    assert _call(auth, [], path="/healthz") == (200, {})
    with pytest.raises(ServiceError):
        TokenAuth(None)
