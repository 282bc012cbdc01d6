"""`audiosearch doctor`: damaged indexes are reported, repaired where possible, and healthy ones pass."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.doctor import doctor
from audiosearch.index import VectorIndex
from audiosearch.ingest import ingest
from audiosearch.query import query

from .conftest import write

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    """A healthy index over a small library of its own (so tests may change the files)."""
    root = tmp_path_factory.mktemp("doctor")
    write(root / "lib" / "tone.wav", syn.tone(440, 3), 16000)
    write(root / "lib" / "noise.flac", syn.noise(12, seed=1), 16000)
    write(root / "lib" / "chord.wav", syn.chord([261.6, 329.6, 392.0], 4), 16000)
    ingest([root / "lib"], index_dir=root / "idx", model=str(tiny_model), device="cpu", precision="fp32")
    return root


@pytest.fixture
def damaged(built, tmp_path) -> tuple[Path, Path]:
    """A private copy of the healthy library and index, to damage: (library, index)."""
    shutil.copytree(built / "lib", tmp_path / "lib", copy_function=shutil.copy2)
    shutil.copytree(built / "idx", tmp_path / "idx")
    with sqlite3.connect(tmp_path / "idx" / "audiosearch.db") as db:  # paths point at the copy
        db.execute("UPDATE files SET path = replace(path, ?, ?)", (str(built / "lib"), str(tmp_path / "lib")))
    assert doctor(tmp_path / "idx").ok
    return tmp_path / "lib", tmp_path / "idx"


def sql(index: Path, statement: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(index / "audiosearch.db") as db:
        return db.execute(statement, args).fetchall()


def cli_doctor(index: Path, *extra: str, code: int) -> str:
    result = runner.invoke(app, ["doctor", "--index", str(index), *extra])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def checks(index: Path) -> set[str]:
    return {f.check for f in doctor(index).findings if f.problem}


def assert_index_matches_sqlite(index: Path) -> None:
    stored = sql(index, "SELECT id, vector FROM segments ORDER BY id")
    vectors = VectorIndex.load(index / "vectors.faiss")
    ids = np.array([i for i, _ in stored], dtype=np.int64)
    assert np.array_equal(vectors.ids(), ids)
    assert np.array_equal(vectors.reconstruct(ids), np.stack([np.frombuffer(b, dtype="<f4") for _, b in stored]))


def test_healthy_index_passes(built):
    out = cli_doctor(built / "idx", code=0)
    assert "all checks passed" in out and "3 files, 4 segments" in out
    report = json.loads(cli_doctor(built / "idx", "--json", code=0))
    assert report["ok"] is True and report["findings"] == [] and report["segments"] == 4


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\0" * 4096)


@pytest.mark.parametrize("how", ["delete", "truncate", "garbage"])
def test_damaged_index_file_is_rebuilt(damaged, tiny_model, how):
    lib, index = damaged
    _damage(index / "vectors.faiss", how)
    out = cli_doctor(index, code=1)
    assert "problem [fixable]" in out and ("missing" in out or "unreadable" in out)
    out = cli_doctor(index, "--repair", code=0)
    assert "rebuilt the FAISS index file from SQLite (4 vectors)" in out and "all problems fixed" in out
    assert_index_matches_sqlite(index)
    cli_doctor(index, code=0)

    _damage(index / "vectors.faiss", how)
    hit = query(lib / "tone.wav", index_dir=index, model=str(tiny_model), filter=False, k=1, device="cpu").hits[0]
    assert hit.path == str(lib / "tone.wav")  # a query repairs from SQLite, and saves when no one is writing
    assert_index_matches_sqlite(index)


def test_stray_rows_and_wrong_counts_are_repaired(damaged):
    _, index = damaged
    sql(index, 'INSERT INTO segments(file_id, start, "end", vector, scores) '
               'SELECT 999, start, "end", vector, scores FROM segments LIMIT 1')
    sql(index, "INSERT INTO segment_labels(label_id, segment_id, score) VALUES (0, 123456, 0.5)")
    sql(index, "UPDATE labels SET count = count + 7 WHERE id = 5")
    report = json.loads(cli_doctor(index, "--json", code=1))
    found = {f["check"]: f for f in report["findings"]}
    assert set(found) == {"orphan-segments", "orphan-label-rows", "label-counts", "index-missing"}
    assert found["orphan-segments"]["count"] == 1 and found["label-counts"]["examples"][0].endswith("actual")
    repaired = json.loads(cli_doctor(index, "--repair", "--json", code=0))
    assert repaired["ok"] and repaired["remaining"] == [] and len(repaired["repairs"]) == 4
    assert sql(index, "SELECT COUNT(*) FROM segments WHERE file_id = 999") == [(0,)]
    assert sql(index, "SELECT COUNT(*) FROM labels WHERE count != "
                      "(SELECT COUNT(*) FROM segment_labels WHERE label_id = labels.id)") == [(0,)]
    assert_index_matches_sqlite(index)


def test_segment_missing_from_sqlite_is_found_and_its_file_reembedded(damaged):
    lib, index = damaged
    (seg, path), = sql(index, "SELECT segments.id, path FROM segments JOIN files ON files.id = file_id "
                              "WHERE path LIKE '%tone.wav'")
    sql(index, "DELETE FROM segment_labels WHERE segment_id = ?", (seg,))
    sql(index, "DELETE FROM segments WHERE id = ?", (seg,))
    assert checks(index) == {"index-extra", "empty-files"}
    assert doctor(index, repair=True).ok
    assert path not in {r[0] for r in sql(index, "SELECT path FROM files")}
    summary = ingest([lib], index_dir=index)
    assert (summary.added, summary.unchanged) == (1, 2)
    assert doctor(index).ok


def test_vectors_that_differ_are_rebuilt(damaged):
    _, index = damaged
    (seg, blob), = sql(index, "SELECT id, vector FROM segments ORDER BY id LIMIT 1")
    flipped = (-np.frombuffer(blob, dtype="<f4")).astype("<f4").tobytes()
    sql(index, "UPDATE segments SET vector = ? WHERE id = ?", (flipped, seg))
    report = doctor(index)
    assert [(f.check, f.examples) for f in report.findings] == [("index-vectors", [str(seg)])]
    assert doctor(index, repair=True).ok
    assert_index_matches_sqlite(index)


def test_malformed_vector_is_forgotten(damaged):
    _, index = damaged
    sql(index, "UPDATE segments SET vector = x'00' WHERE id = (SELECT MIN(id) FROM segments)")
    assert checks(index) == {"malformed-segments"}
    report = doctor(index, repair=True)
    assert report.ok and any("malformed" in line for line in report.repairs)
    assert sql(index, "SELECT COUNT(*) FROM segments WHERE length(vector) != 256") == [(0,)]


def test_segments_of_failed_files_are_removed(damaged):
    _, index = damaged
    sql(index, "UPDATE files SET status = 'failed', error = 'x' WHERE path LIKE '%chord.wav'")
    assert checks(index) == {"unsearchable-segments"}
    assert doctor(index, repair=True).ok
    assert sql(index, "SELECT COUNT(*) FROM segments JOIN files ON files.id = file_id WHERE status != 'ok'") == [(0,)]


def test_changed_and_deleted_files_need_ingest(damaged):
    lib, index = damaged
    write(lib / "tone.wav", syn.tone(880, 3), 16000)
    (lib / "chord.wav").unlink()
    out = cli_doctor(index, "--repair", code=1)  # doctor cannot embed: it says what to run
    assert "1 files changed on disk" in out and "1 indexed files are gone" in out and "audiosearch ingest" in out
    ingest([lib], index_dir=index)
    cli_doctor(index, code=0)


def test_leftover_temp_file_is_a_note(damaged):
    _, index = damaged
    (index / ".vectors.faiss.abc123.tmp").write_bytes(b"partial")
    out = cli_doctor(index, code=0)
    assert "note: 1 temporary files left by interrupted index saves" in out
    assert "removed 1 temporary files" in cli_doctor(index, "--repair", code=0)
    assert not list(index.glob(".vectors.faiss.*.tmp"))


def test_corrupt_database_is_reported_not_repaired(damaged):
    _, index = damaged
    db = index / "audiosearch.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'segments'").fetchone()[0]
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size
    data[start : start + page_size] = b"\xa5" * page_size  # the segments table's root page
    db.write_bytes(data)
    out = cli_doctor(index, "--repair", code=1)
    assert "problem:" in out and ("integrity check failed" in out or "cannot be read" in out)
    assert "nothing repaired" in out or "cannot be read" in out


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_repair_waits_for_no_writer(damaged):
    _, index = damaged
    (index / "vectors.faiss").unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(index / "write.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        out = cli_doctor(index, "--repair", code=1)
        assert "another audiosearch process is writing" in out
        assert "missing" in cli_doctor(index, code=1)  # checking needs no lock
    finally:
        holder.kill()
        holder.wait()
    cli_doctor(index, "--repair", code=0)


def test_no_index(tmp_path):
    assert "no index at" in cli_doctor(tmp_path / "nothing", code=1)
