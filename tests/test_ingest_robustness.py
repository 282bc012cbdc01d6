"""Ingest under change, bad input, crashing decoders, short and silent clips, concurrent use, and untrusted input."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import audiosearch.decode_pool as decode_pool
import audiosearch.ingest as ingest_module
from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.collection import Collection
from audiosearch.decode_pool import DecodePool
from audiosearch.index import MAGIC, VectorIndex
from audiosearch.query import query
from audiosearch.store import Store, migrations

from .conftest import write

runner = CliRunner()


def cli(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def ingest_json(folder: Path, index: Path, model: Path | None = None, *extra: object) -> dict:
    """The --json summary; the exit code must be 3 exactly when files failed (README: exit codes)."""
    args = ["ingest", folder, "--index", index, "--json", *extra] + (["--model", model] if model else [])
    result = runner.invoke(app, [str(a) for a in args])
    summary = json.loads(result.stdout)
    assert result.exit_code == (3 if summary["failed"] or summary["unlisted_folders"] else 0), result.output
    return summary


def rows(index: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(index / "audiosearch.db") as db:
        return db.execute(sql, args).fetchall()


def files(index: Path) -> dict[str, tuple[str, str | None]]:
    return {path: (status, error) for path, status, error in rows(index, "SELECT path, status, error FROM files")}


def segment_ids(index: Path, path: Path) -> list[int]:
    sql = "SELECT segments.id FROM segments JOIN files ON files.id = file_id WHERE path = ? ORDER BY segments.id"
    return [r[0] for r in rows(index, sql, (str(path),))]


def top_hit(index: Path, model: Path, clip: Path) -> tuple[str, float]:
    hit = query(clip, index_dir=index, model=str(model), filter=False, k=1, device="cpu").hits[0]
    return hit.path, hit.similarity


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Paths handed to decoding (and so to the model) during the test."""
    seen: list[str] = []
    real = DecodePool.map

    def record(self, tasks):
        tasks = list(tasks)
        seen.extend(path for _, path in tasks)
        return real(self, tasks)

    monkeypatch.setattr(DecodePool, "map", record)
    return seen


# -- 1. incremental --------------------------------------------------------------------------------
def test_only_changes_are_embedded_and_queries_follow(tiny_model, tmp_path, decoded):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    a = write(lib / "a.wav", syn.tone(440, 3), 16000)
    b = write(lib / "b.wav", syn.noise(3, seed=1), 16000, subtype="FLOAT")
    c = write(lib / "c.flac", syn.chord([261.6, 329.6, 392.0], 4), 16000)
    d = write(lib / "d.wav", syn.clicks(3), 16000)
    t = write(lib / "t.wav", syn.chirp(300, 3000, 3), 16000)
    first = ingest_json(lib, index, tiny_model)
    assert (first["added"], first["segments"], first["pruned"]) == (5, 5, True)
    a_ids, t_ids = segment_ids(index, a), segment_ids(index, t)
    old_b = write(tmp_path / "old_b.wav", syn.noise(3, seed=1), 16000, subtype="FLOAT")

    e = write(lib / "e.wav", syn.tone(880, 2), 16000)  # new
    write(b, syn.chord([196, 246.9, 293.7], 3), 16000, subtype="FLOAT")  # same size, other content
    os.utime(b, (1e9, 1e9))
    write(c, syn.chord([261.6, 329.6, 392.0], 6), 16000)  # other size
    d.unlink()  # deleted
    moved = lib / "sub" / "renamed a.wav"
    moved.parent.mkdir()
    a.rename(moved)  # renamed, same bytes
    os.utime(t, (2e9, 2e9))  # touched, same bytes
    decoded.clear()
    second = ingest_json(lib, index)
    assert sorted(decoded) == sorted([str(e), str(b), str(c)])
    assert {k: second[k] for k in ("added", "updated", "unchanged", "moved", "removed")} == {
        "added": 1, "updated": 2, "unchanged": 1, "moved": 1, "removed": 1
    }
    assert segment_ids(index, moved) == a_ids and segment_ids(index, t) == t_ids  # kept, not re-embedded
    assert str(d) not in files(index) and str(a) not in files(index)
    assert top_hit(index, tiny_model, moved) == (str(moved), pytest.approx(1.0, abs=1e-4))
    assert top_hit(index, tiny_model, b) == (str(b), pytest.approx(1.0, abs=1e-4))
    assert top_hit(index, tiny_model, old_b)[1] < 0.999  # the old content of b is gone from the index
    info = json.loads(cli("info", "--index", index, "--json"))
    assert info["segments"] == info["vector_index"]["ntotal"] == 5 and info["index_current"]

    moved.unlink()  # e's bytes replace the indexed file at t's path: a move onto an occupied path
    e.rename(t)
    decoded.clear()
    third = ingest_json(lib, index)
    assert decoded == [] and (third["moved"], third["removed"], third["added"]) == (1, 1, 0)
    assert top_hit(index, tiny_model, t) == (str(t), pytest.approx(1.0, abs=1e-4))

    decoded.clear()
    fourth = ingest_json(lib, index)
    assert decoded == [] and fourth["unchanged"] == 3 and fourth["added"] + fourth["updated"] == 0


def test_indexes_hashed_with_blake2b_keep_their_moves_and_touches(tiny_model, tmp_path, decoded):
    """Indexes written before XXH3 hold bare BLAKE2b-128 digests: still compared, by BLAKE2b."""
    lib, index = tmp_path / "lib", tmp_path / "idx"
    a = write(lib / "a.wav", syn.tone(440, 3), 16000)
    t = write(lib / "t.wav", syn.chirp(300, 3000, 3), 16000)
    ingest_json(lib, index, tiny_model)
    assert all(h.startswith("xxh3:") for (h,) in rows(index, "SELECT hash FROM files"))
    with sqlite3.connect(index / "audiosearch.db") as db:
        for path in (a, t):
            db.execute("UPDATE files SET hash = ? WHERE path = ?", (hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(), str(path)))
    moved = lib / "moved.wav"
    a.rename(moved)
    os.utime(t, (2e9, 2e9))
    decoded.clear()
    again = ingest_json(lib, index)
    assert decoded == [] and (again["moved"], again["unchanged"], again["added"]) == (1, 1, 0)


def test_no_prune_keeps_deleted_files(tiny_model, tmp_path):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    keep = write(lib / "keep.wav", syn.tone(500, 2), 16000)
    gone = write(lib / "gone.wav", syn.noise(2), 16000)
    ingest_json(lib, index, tiny_model)
    gone.unlink()
    out = cli("ingest", lib, "--index", index, "--no-prune")
    assert "pruning off" in out and str(gone) in files(index)
    assert "1 removed" in cli("ingest", lib, "--index", index) and set(files(index)) == {str(keep)}


# -- 4. bad input ------------------------------------------------------------------------------------
def _truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _wav_claiming_2_31_frames(path: Path) -> Path:
    """An 8-bit WAV whose data chunk says 2**31 bytes, i.e. 2**31 frames."""
    write(path, syn.tone(440, 3), 16000, subtype="PCM_U8")
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 2**31)
    path.write_bytes(data)
    return path


def _flac_claiming_2_31_frames(path: Path) -> Path:
    """A FLAC whose STREAMINFO says 2**31 samples (about 13.5 hours at 44.1 kHz)."""
    write(path, syn.tone(440, 1, 44100), 44100)
    data = bytearray(path.read_bytes())
    field = int.from_bytes(data[18:26], "big")  # rate, channels, bits and the 36-bit total-samples field
    data[18:26] = ((field & ~((1 << 36) - 1)) | 2**31).to_bytes(8, "big")
    path.write_bytes(data)
    return path


def _unsupported_codec(path: Path) -> Path:
    """A WAV whose format tag says WMA (0x0161), which libsndfile does not decode."""
    write(path, syn.tone(440, 1), 16000)
    data = bytearray(path.read_bytes())
    at = data.find(b"fmt ")
    data[at + 8 : at + 10] = struct.pack("<H", 0x0161)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def bad_library(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    lib = tmp_path_factory.mktemp("bad") / "lib"
    good = {
        "tone": write(lib / "good" / "tone.wav", syn.tone(440, 3), 16000),
        "noise": write(lib / "good" / "noise.flac", syn.noise(3, seed=5), 16000),
        "spaces": write(lib / "odd" / "sp ace ü 音.wav", syn.chord([220, 277, 330], 2), 16000),
        "newline": write(lib / "odd" / "new\nline.wav", syn.clicks(2), 16000),
        "quotes": write(lib / "odd" / "it's \"x\"; DROP TABLE files; --.wav", syn.chirp(200, 900, 2), 16000),
        "flac_as_mp3": write(lib / "odd" / "really a flac.mp3", syn.tone(660, 2), 16000, format="FLAC"),
        "huge_wav": _wav_claiming_2_31_frames(lib / "bad" / "huge header.wav"),
        "trunc_wav": _truncated(write(lib / "bad" / "trunc.wav", syn.tone(300, 3), 16000), 0.4),
        "trunc_mp3": _truncated(write(lib / "bad" / "trunc.mp3", syn.tone(300, 3), 16000, format="MP3"), 0.3),
        "vanishing": write(lib / "bad" / "vanishing.wav", syn.tone(700, 2), 16000),
        "no_access": write(lib / "bad" / "no access.wav", syn.tone(800, 2), 16000),
    }
    bad = {
        "trunc_flac": _truncated(write(lib / "bad" / "trunc.flac", syn.noise(3), 16000), 0.3),
        "zero": lib / "bad" / "zero.wav",
        "random": lib / "bad" / "random.wav",
        "huge_flac": _flac_claiming_2_31_frames(lib / "bad" / "huge header.flac"),
        "codec": _unsupported_codec(lib / "bad" / "wma.wav"),
        "loop_a": lib / "bad" / "loop a.wav",
        "loop_b": lib / "bad" / "loop b.wav",
        "dangling": lib / "bad" / "dangling.wav",
    }
    bad["zero"].write_bytes(b"")
    bad["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    bad["loop_a"].symlink_to(bad["loop_b"].name)
    bad["loop_b"].symlink_to(bad["loop_a"].name)
    bad["dangling"].symlink_to("nowhere.wav")
    (lib / "bad" / "up").symlink_to("..")  # a folder loop: must neither hang nor index files twice
    os.mkfifo(lib / "bad" / "fifo.wav")  # reading it would block forever
    (lib / os.fsdecode(b"bad name \xff.wav")).write_bytes(good["tone"].read_bytes())
    good["no_access"].chmod(0)
    return lib, {**good, **bad}


@pytest.fixture(scope="module")
def bad_ingest(bad_library, tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    lib, paths = bad_library
    index = tmp_path_factory.mktemp("bad") / "idx"
    real_scan = ingest_module.scan

    def scan_then_delete(roots, unreadable=None):
        found = real_scan(roots, unreadable)
        paths["vanishing"].unlink()  # gone between the scan and its decoding
        return found

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest_module, "scan", scan_then_delete)
        summary = ingest_json(lib, index, tiny_model, "--workers", "1")
    return index, summary


def test_bad_files_are_recorded_and_good_ones_indexed(bad_library, bad_ingest, tiny_model):
    lib, p = bad_library
    index, summary = bad_ingest
    status = files(index)
    failed = {f["path"]: f["error"] for f in summary["failed"]}
    for name in ("tone", "noise", "spaces", "newline", "quotes", "flac_as_mp3", "huge_wav", "trunc_wav", "trunc_mp3"):
        assert status[str(p[name])] == ("ok", None), name
    for name in ("trunc_flac", "zero", "random", "huge_flac", "codec", "loop_a", "loop_b", "dangling", "vanishing"):
        state, error = status[str(p[name])]
        assert state == "failed" and error and failed[str(p[name])] == error, name
    assert "not readable audio" in status[str(p["codec"])][1] and status[str(p["zero"])][1] == "an empty file (0 bytes)"
    assert status[str(p["dangling"])][1].startswith("a broken symlink"), status[str(p["dangling"])][1]
    assert "symbolic links" in status[str(p["loop_a"])][1]
    assert "No such file" in status[str(p["vanishing"])][1]
    assert failed[str(lib) + "/bad name \\xff.wav"].startswith("file name is not valid UTF-8")
    assert not any("fifo" in path or "bad name" in path or "/up/" in path for path in status)
    if os.access(p["no_access"], os.R_OK):
        # Running as root (as CI here does), chmod 0 does not stop reading: the file is simply indexed.
        assert status[str(p["no_access"])] == ("ok", None)
    else:
        assert status[str(p["no_access"])][0] == "failed" and "Permission denied" in status[str(p["no_access"])][1]

    durations = dict(rows(index, "SELECT path, duration FROM files WHERE status = 'ok'"))
    assert durations[str(p["huge_wav"])] == pytest.approx(3.0)  # libsndfile trusts the data, not the header
    assert 0.5 < durations[str(p["trunc_wav"])] < 3.0 and 0 < durations[str(p["trunc_mp3"])] < 3.0  # the prefix
    segments = rows(index, "SELECT COUNT(*) FROM segments")[0][0]
    assert segments == summary["segments"] == summary["index"]["added"] == len(durations)
    assert top_hit(index, tiny_model, p["tone"]) == (str(p["tone"]), pytest.approx(1.0, abs=1e-4))
    assert rows(index, "SELECT name FROM sqlite_master WHERE name = 'files'") == [("files",)]

    errors = json.loads(cli("info", "--index", index, "--errors", "--json"))["errors"]
    listed = {e["path"]: e["error"] for e in errors}
    assert {path: error for path, (state, error) in status.items() if state == "failed"} == listed


def test_bad_files_are_not_retried_unless_asked(bad_library, bad_ingest, decoded):
    lib, p = bad_library
    index, _ = bad_ingest
    again = ingest_json(lib, index)
    assert decoded == [] and again["added"] + again["updated"] == 0
    assert again["removed"] == 1  # the vanished file is pruned
    assert [f["path"] for f in again["failed"]] == [str(lib) + "/bad name \\xff.wav"]  # reported on every run


def test_unlistable_folder_keeps_its_files(tiny_model, tmp_path, monkeypatch):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    write(lib / "open" / "a.wav", syn.tone(440, 2), 16000)
    hidden = write(lib / "closed" / "b.wav", syn.noise(2), 16000)
    ingest_json(lib, index, tiny_model)
    hidden.parent.chmod(0)
    if os.access(hidden.parent, os.R_OK):  # root reads it anyway: refuse the listing as the kernel would for a user
        real = os.scandir
        monkeypatch.setattr(ingest_module.os, "scandir", lambda path=".": _deny(path, hidden.parent, real))
    try:
        summary = ingest_json(lib, index)
    finally:
        hidden.parent.chmod(0o755)
    assert summary["removed"] == 0 and str(hidden) in files(index)
    assert summary["failed"] == []  # a folder is not a file: it is listed on its own
    unlisted = summary["unlisted_folders"]
    assert unlisted[0]["path"] == str(hidden.parent) and "cannot list folder" in unlisted[0]["error"]


def _deny(path, denied: Path, real):
    if Path(path) == denied:
        raise PermissionError(13, "Permission denied", str(path))
    return real(path)


def test_decoder_crash_marks_only_that_file(tiny_model, tmp_path, monkeypatch, decoded):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    names = [write(lib / f"{i}.wav", syn.tone(300 + 100 * i, 2), 16000) for i in range(4)]
    bomb = names[1]
    real = decode_pool.open_stream

    def segfault_on_bomb(path):  # runs in the (forked) decoding worker
        if Path(path) == bomb:
            faulthandler.disable()  # pytest's handler would print a traceback first
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path)

    monkeypatch.setattr(decode_pool, "open_stream", segfault_on_bomb)
    summary = ingest_json(lib, index, tiny_model, "--workers", "1")
    assert summary["failed"] == [{"path": str(bomb), "error": "decoder crashed (killed by signal 11)"}]
    assert summary["added"] == 3 and files(index)[str(bomb)][0] == "failed"

    decoded.clear()
    assert ingest_json(lib, index)["unchanged"] == 4 and decoded == []
    again = ingest_json(lib, index, None, "--retry-failed", "--workers", "1")
    assert decoded == [str(bomb)] and again["failed"][0]["error"].startswith("decoder crashed")


def test_hung_decoder_is_killed(tiny_model, tmp_path, monkeypatch):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    ok = write(lib / "ok.wav", syn.tone(440, 2), 16000)
    stuck = write(lib / "stuck.wav", syn.tone(550, 2), 16000)
    real = decode_pool.open_stream
    monkeypatch.setattr(decode_pool, "open_stream", lambda p: time.sleep(60) if Path(p) == stuck else real(p))
    monkeypatch.setattr(decode_pool, "DECODE_TIMEOUT", 1.0)
    summary = ingest_json(lib, index, tiny_model, "--workers", "1")
    assert summary["failed"] == [{"path": str(stuck), "error": "decoding took longer than 1 s"}]
    assert files(index)[str(ok)] == ("ok", None)


def test_write_failure_ends_the_run_with_one_line(tiny_model, tmp_path, monkeypatch):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    clips = [write(lib / f"{i}.wav", syn.tone(300 + 100 * i, 2), 16000) for i in range(3)]
    ingest_json(lib, index, tiny_model, "--workers", "1")
    for clip in clips:
        write(clip, syn.noise(2, seed=7), 16000)  # every file changed: all are embedded again
    real = Store.write_file

    def disk_full(self, row, segments, *prints):
        if row["path"] == str(clips[1]):
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, row, segments, *prints)

    monkeypatch.setattr(Store, "write_file", disk_full)
    result: list[str] = []
    run = threading.Thread(target=lambda: result.append(cli("ingest", lib, "--index", index, code=1)), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "ingest hung after its writer failed"
    (error,) = [line for line in result[0].splitlines() if line.startswith("Error:")]
    assert "cannot write to the index" in error and "database or disk is full" in error
    assert rows(index, "PRAGMA integrity_check") == [("ok",)]
    assert rows(index, "SELECT COUNT(*) FROM segments") == [(3,)]  # the failed transaction left nothing half-done
    monkeypatch.undo()
    ingest_json(lib, index)
    new = decode_pool.content_hash(clips[0])
    assert rows(index, "SELECT COUNT(*) FROM files WHERE hash = ? AND status = 'ok'", (new,)) == [(3,)]


# -- 5. silence and very short clips ----------------------------------------------------------------
def test_silence_and_clips_of_a_few_samples_are_embedded(tiny_model, tmp_path, decoded):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    silence = write(lib / "silence.wav", np.zeros(3 * 16000, dtype=np.float32), 16000)
    tiny = write(lib / "tiny.wav", syn.tone(440, 0.05), 16000)
    click = write(lib / "click.wav", np.array([0.9], dtype=np.float32), 16000)  # one sample
    tick = write(lib / "tick.wav", syn.clicks(0.01), 44100)  # resampled to 160 samples
    empty = write(lib / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    edge = write(lib / "edge.wav", syn.tone(440, 0.1), 16000)
    summary = ingest_json(lib, index, tiny_model)
    assert {s["path"]: s["reason"] for s in summary["skipped"]} == {str(empty): "holds no audio (0 samples)"}
    for path in (silence, tiny, click, tick, edge):
        assert files(index)[str(path)] == ("ok", None)
    sql = 'SELECT start, "end", vector FROM segments JOIN files ON files.id = file_id WHERE path = ?'
    (start, end, blob), = rows(index, sql, (str(click),))
    assert (start, end) == (0.0, 1 / 16000)  # the true length, padding not counted
    vectors = {p: np.frombuffer(rows(index, sql, (str(p),))[0][2], dtype="<f4") for p in (silence, click, tick)}
    for vector in vectors.values():
        assert np.isfinite(vector).all() and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(vectors[click], vectors[tick], atol=1e-3)  # padded clips still differ
    decoded.clear()
    assert ingest_json(lib, index)["unchanged"] == 6 and decoded == []


def test_files_an_older_version_skipped_as_too_short_are_embedded(tiny_model, tmp_path):
    lib, index = tmp_path / "lib", tmp_path / "idx"
    tiny = write(lib / "tiny.wav", syn.tone(440, 0.05), 16000)
    ingest_json(lib, index, tiny_model)
    with sqlite3.connect(index / "audiosearch.db") as db:  # as versions before padding recorded it
        db.execute("UPDATE files SET status = 'skipped', error = 'too short to embed (0.050 s < 0.1 s)'")
        db.execute("DELETE FROM segment_labels")
        db.execute("DELETE FROM segments")
    summary = ingest_json(lib, index)
    assert summary["updated"] == 1 and files(index)[str(tiny)] == ("ok", None)


# -- 6. concurrency ----------------------------------------------------------------------------------
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_is_refused_and_readers_go_on(library, tiny_model, tmp_path):
    index = tmp_path / "idx"
    ingest_json(library / "tones", index, tiny_model)
    (index / "vectors.faiss").unlink()  # readers must rebuild it in memory, and cannot save it while locked
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(index / "write.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        out = cli("ingest", library, "--index", index, code=1)
        assert "another audiosearch process is writing to" in out and out.strip().count("\n") == 0
        assert top_hit(index, tiny_model, library / "tones" / "a440.wav")[0] == str(library / "tones" / "a440.wav")
        assert not (index / "vectors.faiss").exists()
    finally:
        holder.kill()
        holder.wait()
    top_hit(index, tiny_model, library / "tones" / "a440.wav")
    assert (index / "vectors.faiss").exists()  # the next reader that could take the lock saved its repair


def _create_store(index: Path, start_at: float) -> str:
    while time.time() < start_at:
        pass
    try:
        Store(index, create=True).close()
        return "ok"
    except Exception as e:  # the test reports what went wrong
        return repr(e)


def test_first_runs_racing_to_create_an_index_all_succeed(tmp_path):
    start_at = time.time() + 0.5
    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.starmap(_create_store, [(tmp_path / "idx", start_at)] * 6)
    assert results == ["ok"] * 6
    assert rows(tmp_path / "idx", "SELECT COUNT(*) FROM _sqlite_migrations") == [(len(migrations._migrations),)]


PAUSED_INGEST = """
import os, sys, time
from audiosearch.model import Model
gate, after = sys.argv[1], int(sys.argv[2])
real, calls = Model.launch, [0]
def launch(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == after:
        open(gate + ".paused", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.02)
    return real(self, *args, **kwargs)
Model.launch = launch
from audiosearch.cli import app
sys.argv = ["audiosearch", *sys.argv[3:]]
app()
"""


def test_query_during_ingest_sees_committed_state(tiny_model, tmp_path):
    lib, index, gate = tmp_path / "lib", tmp_path / "idx", tmp_path / "gate"
    clips = [write(lib / f"{i:02d}.wav", syn.tone(200 + 37 * i, 2) + syn.noise(2, seed=i, amp=0.02), 16000)
             for i in range(10)]
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_INGEST, str(gate), "4", "ingest", str(lib), "--index", str(index),
         "--model", str(tiny_model), "--batch-size", "2", "--workers", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: Path(str(gate) + ".paused").exists() and _committed(index) >= 2, proc)
        time.sleep(ingest_module.COMMIT_SECONDS + 0.5)  # whatever finished before the pause is committed now
        committed = {r[0] for r in rows(index, "SELECT path FROM files WHERE status = 'ok'")}
        assert 2 <= len(committed) < len(clips)
        result = query(clips[0], index_dir=index, model=str(tiny_model), filter=False, per_file=False, k=100,
                       device="cpu")
        assert {h.path for h in result.hits} == committed
        assert "another audiosearch process" in cli("ingest", lib, "--index", index, code=1)
    finally:
        gate.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["added"] == len(clips)
    final = query(clips[0], index_dir=index, model=str(tiny_model), filter=False, per_file=False, k=100, device="cpu")
    assert {h.path for h in final.hits} == {str(c) for c in clips}


def _committed(index: Path) -> int:
    if not (index / "audiosearch.db").exists():
        return 0
    try:
        return rows(index, "SELECT COUNT(*) FROM files WHERE status = 'ok'")[0][0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- 7. safety ---------------------------------------------------------------------------------------
def test_pickle_checkpoint_is_refused(tmp_path, monkeypatch, library):
    from transformers import ASTForAudioClassification

    path = syn.save_random_checkpoint(tmp_path / "bin-only", hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64)
    weights = ASTForAudioClassification.from_pretrained(path).state_dict()
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")  # the same checkpoint, as a pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    out = cli("ingest", library / "tones", "--index", tmp_path / "idx", "--model", path, code=1)
    assert f"cannot load AST model '{path}'" in out and "safetensors" in out and out.strip().count("\n") == 0


def test_index_file_holds_no_pickle(library, tiny_model, tmp_path, monkeypatch):
    index = tmp_path / "idx"
    ingest_json(library / "tones", index, tiny_model)
    assert (index / "vectors.faiss").read_bytes().startswith(MAGIC)  # header + FAISS' own serialisation

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading the index")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    loaded = VectorIndex.load(index / "vectors.faiss")
    collection = Collection(index)
    try:
        assert loaded.generation == collection.store.generation
        assert collection.load_index()[0].ntotal == loaded.ntotal == collection.store.count()
    finally:
        collection.close()


def test_label_filter_is_never_sql(library, tiny_model, tmp_path):
    index = tmp_path / "idx"
    ingest_json(library / "tones", index, tiny_model)
    clip = library / "tones" / "a440.wav"
    out = cli("query", clip, "--index", index, "--label", "x' OR '1'='1", code=1)
    assert "unknown label" in out
    assert rows(index, "SELECT COUNT(*) FROM files")[0][0] == 2
