"""SIGKILL `audiosearch ingest` at several points, resume, and end exactly where one clean run ends."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.doctor import doctor
from audiosearch.index import VectorIndex
from audiosearch.ingest import ingest

from .conftest import write

FILES = 12

# Runs the CLI with two test-only changes: each model batch sleeps a little, so a run lasts several
# commits on any machine, and in the "save" modes the process SIGKILLs itself inside an index save,
# after FAISS has written its bytes to the temp file and before the rename (the checkpoint mode saves
# after every commit and dies in the first save the writer thread makes once this run has committed
# a file; the final mode dies in the save that ends the run, which the main thread makes).
HARNESS = """
import os, signal, sqlite3, sys, threading, time
import faiss
import audiosearch.ingest
from audiosearch.model import Model

mode, args = sys.argv[1], sys.argv[2:]
launch = Model.launch
def slow_launch(self, *a, **k):
    time.sleep(0.3)
    return launch(self, *a, **k)
Model.launch = slow_launch

def committed():
    db = os.path.join(args[args.index("--index") + 1], "audiosearch.db")
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM files WHERE status = 'ok'").fetchone()[0]

write_index, before = faiss.write_index, committed()
def write_then_die(index, writer):
    write_index(index, writer)
    final = threading.current_thread() is threading.main_thread()
    if (mode == "checkpoint" and not final and committed() > before) or (mode == "final" and final):
        os.kill(os.getpid(), signal.SIGKILL)
faiss.write_index = write_then_die
if mode == "checkpoint":
    audiosearch.ingest.CHECKPOINT_SECONDS = 0.0
from audiosearch.cli import app
sys.argv = ["audiosearch", *args]
app()
"""


@pytest.fixture(scope="module")
def crash_library(tmp_path_factory) -> Path:
    """One- and two-segment files of different sounds."""
    root = tmp_path_factory.mktemp("crash") / "lib"
    for i in range(FILES):
        seconds = 12.0 if i % 4 == 0 else 2.0
        sound = syn.tone(180 + 45 * i, seconds) if i % 2 else syn.noise(seconds, seed=i)
        write(root / f"{i:02d}.wav", sound, 16000)
    return root


@pytest.fixture(scope="module")
def clean(crash_library, tiny_model, tmp_path_factory) -> set[tuple[str, float]]:
    index = tmp_path_factory.mktemp("crash") / "clean"
    ingest([crash_library], index_dir=index, model=str(tiny_model), device="cpu", precision="fp32", batch_size=2)
    return segments(index)


def db(index: Path) -> sqlite3.Connection:
    return sqlite3.connect(index / "audiosearch.db")


def segments(index: Path) -> set[tuple[str, float]]:
    with db(index) as conn:
        return set(conn.execute("SELECT path, start FROM segments JOIN files ON files.id = file_id").fetchall())


def segment_ids_by_file(index: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with db(index) as conn:
        for path, seg in conn.execute(
            "SELECT path, segments.id FROM segments JOIN files ON files.id = file_id ORDER BY segments.id"
        ):
            out.setdefault(path, []).append(seg)
    return out


def committed(index: Path) -> int:
    try:
        with db(index) as conn:
            return conn.execute("SELECT COUNT(*) FROM files WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:  # no database or no schema yet
        return 0


def start(mode: str, library: Path, index: Path, model: Path) -> subprocess.Popen:
    args = ["ingest", str(library), "--index", str(index), "--model", str(model), "--batch-size", "2",
            "--workers", "1", "--device", "cpu", "--precision", "fp32", "--json"]
    return subprocess.Popen([sys.executable, "-c", HARNESS, mode, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ingest ended before the kill point: {proc.communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def died_by_sigkill(proc: subprocess.Popen) -> None:
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.communicate()[1].decode()[-2000:]


def assert_whole(index: Path, clean: set[tuple[str, float]]) -> None:
    """What a killed run left is a consistent prefix: each committed file has exactly its clean segments."""
    with db(index) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    by_file: dict[str, set[float]] = {}
    for path, start_s in clean:
        by_file.setdefault(path, set()).add(start_s)
    for path, ids in segment_ids_by_file(index).items():
        assert {s for p, s in segments(index) if p == path} == by_file[path] and len(ids) == len(by_file[path])


def test_killed_ingest_resumes_without_losing_or_repeating_work(crash_library, tiny_model, clean, tmp_path):
    index = tmp_path / "idx"

    early = start("plain", crash_library, index, tiny_model)  # holds the write lock: loading the model, planning
    kill_when(early, lambda: (index / "write.lock").exists())
    assert committed(index) == 0

    mid = start("plain", crash_library, index, tiny_model)  # between commits, with batches in flight
    kill_when(mid, lambda: committed(index) >= 3)
    done_mid = segment_ids_by_file(index)
    assert 3 <= len(done_mid) < FILES
    assert_whole(index, clean)

    checkpoint = start("checkpoint", crash_library, index, tiny_model)  # inside a mid-run index save
    died_by_sigkill(checkpoint)
    assert list(index.glob(".vectors.faiss.*.tmp")), "the kill did not land inside an index save"
    assert_whole(index, clean)
    done_checkpoint = segment_ids_by_file(index)
    assert len(done_checkpoint) > len(done_mid)

    final = start("final", crash_library, index, tiny_model)  # inside the save that ends the run
    died_by_sigkill(final)
    assert list(index.glob(".vectors.faiss.*.tmp"))
    assert_whole(index, clean)
    assert len(segment_ids_by_file(index)) == FILES
    # the FAISS file may lag SQLite, or not exist yet if every save so far was killed
    lagging = {"index-file", "index-missing", "index-extra", "prints-file", "prints-missing", "prints-extra"}
    assert {f.check for f in doctor(index).findings if f.problem} <= lagging

    result = CliRunner().invoke(app, ["ingest", str(crash_library), "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 0, FILES)

    assert segments(index) == clean
    final_ids = segment_ids_by_file(index)
    for path, ids in done_checkpoint.items():
        assert final_ids[path] == ids  # committed work was never redone
    with db(index) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = conn.execute("SELECT id, vector FROM segments ORDER BY id").fetchall()
    vectors = VectorIndex.load(index / "vectors.faiss")
    ids = np.array([i for i, _ in stored], dtype=np.int64)
    assert vectors.ntotal == len(stored) == len(clean)
    assert np.array_equal(vectors.ids(), ids)
    assert np.array_equal(vectors.reconstruct(ids), np.stack([np.frombuffer(b, dtype="<f4") for _, b in stored]))
    assert not list(index.glob(".vectors.faiss.*.tmp"))
    assert doctor(index).ok
