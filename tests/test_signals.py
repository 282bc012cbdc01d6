"""The whole CLI killed (SIGKILL), stopped (SIGTERM) or interrupted (Ctrl-C) while its decoders work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audiosearch import synthetic as syn
from audiosearch.ingest import ingest
from audiosearch.locks import is_locked

from .conftest import write

# The CLI, with test-only changes: decoding a file named slow*.wav writes the worker's pid to $SLOW_MARK
# and sleeps a minute first (a long file's decode), so that a signal finds a worker busy; decoding a
# file named crash*.wav kills its worker with SIGSEGV.
# SIGINT is set back to Python's handler first: a terminal's foreground job has it at its default, but a
# test run started in the background (`nohup make test &`) hands it on ignored, and Python leaves an
# ignored SIGINT ignored, so Ctrl-C would find a CLI that cannot hear it.
HARNESS = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import audiosearch.decode_pool as pool
real = pool.open_stream
def slow(path):
    if os.path.basename(str(path)).startswith("crash"):
        os.kill(os.getpid(), 11)  # a native crash: the pool starts a new worker
    if os.path.basename(str(path)).startswith("slow"):
        with open(os.environ["SLOW_MARK"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
    return real(path)
pool.open_stream = slow
from audiosearch.cli import app
sys.argv = ["audiosearch", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def slow_library(tmp_path_factory) -> Path:
    """Ten quick files, then one slow one (decoded last: names sort so)."""
    root = tmp_path_factory.mktemp("signals") / "lib"
    for i in range(10):
        write(root / f"f{i:02d}.wav", syn.tone(200 + 50 * i, 1.5), 16000)
    write(root / "slow.wav", syn.noise(2.0, seed=1), 16000)
    return root


def start(args: list[object], mark: Path) -> subprocess.Popen:
    env = {**os.environ, "SLOW_MARK": str(mark)}
    return subprocess.Popen([sys.executable, "-c", HARNESS, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


def ingest_args(library: Path, index: Path, model: Path) -> list[object]:
    return ["ingest", library, "--index", index, "--model", model, "--device", "cpu", "--precision", "fp32",
            "--batch-size", "2", "--workers", "2", "--json"]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"ended before the signal: {proc.communicate()[1].decode()[-2000:]}")
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.02)


def group(pgid: int) -> list[int]:
    """Live processes in the process group (the killed CLI's, as it started its own session)."""
    alive = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            alive.append(int(entry))
    return alive


def gone_within(pgid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def committed(index: Path) -> int:
    try:
        with sqlite3.connect(index / "audiosearch.db") as db:
            return db.execute("SELECT COUNT(*) FROM files WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_leaves_no_decoder_and_no_lock(slow_library, tiny_model, tmp_path):
    index, mark = tmp_path / "idx", tmp_path / "slow.pid"
    proc = start(ingest_args(slow_library, index, tiny_model), mark)
    wait_for(mark.exists, proc)  # a decoder is busy with the slow file, the other is idle or decoding
    worker = int(mark.read_text())
    assert worker in group(proc.pid)
    proc.kill()
    proc.wait()
    assert not is_locked(index / "write.lock"), "a decoder kept the index's write lock"
    assert gone_within(proc.pid, 2.0) == [], "processes of the killed ingest are still alive"

    started = time.monotonic()  # the next run starts at once and finishes the job
    summary = ingest([slow_library], index_dir=index, model=str(tiny_model), device="cpu", precision="fp32")
    assert summary.added + summary.unchanged == 11 and not summary.failed
    assert time.monotonic() - started < 60


def test_a_respawned_worker_dies_with_its_parent_too(slow_library, tiny_model, tmp_path):
    library, index, mark = tmp_path / "lib", tmp_path / "idx", tmp_path / "slow.pid"
    shutil.copytree(slow_library, library)
    write(library / "crash.wav", syn.tone(300, 1.0), 16000)  # decoded first, by the only worker
    args = [a if a != "2" else "1" for a in ingest_args(library, index, tiny_model)]  # --workers 1
    proc = start(args, mark)
    wait_for(mark.exists, proc)
    worker = int(mark.read_text())  # the worker started after the crash
    proc.kill()
    proc.wait()
    assert not is_locked(index / "write.lock")
    assert gone_within(proc.pid, 2.0) == []
    assert worker not in group(proc.pid)
    summary = ingest([library], index_dir=index, model=str(tiny_model), device="cpu", precision="fp32")
    assert summary.added + summary.unchanged + len(summary.failed) == 12  # crash.wav may be recorded as failed


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_signal_stops_ingest_within_2_s_and_commits_what_is_done(slow_library, tiny_model, tmp_path, how):
    index, mark = tmp_path / "idx", tmp_path / "slow.pid"
    proc = start(ingest_args(slow_library, index, tiny_model), mark)
    wait_for(lambda: mark.exists() and committed(index) >= 8, proc)  # the last batch waits for the next one
    sent = time.monotonic()
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)  # a plain `kill`, to the CLI alone
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert took < 2.0, f"took {took:.1f} s to stop"
    print(f"stopped in {took:.2f} s")
    assert proc.returncode == (143 if how == "SIGTERM" else 130), err.decode()
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
    assert f"Interrupted ({'SIGTERM' if how == 'SIGTERM' else 'SIGINT'})" in err.decode()
    summary = json.loads(out)
    assert summary["interrupted"] is True and 8 <= summary["added"] == committed(index) < 11
    assert gone_within(proc.pid, 1.0) == []
    assert not is_locked(index / "write.lock")


def test_interrupted_summary_is_marked_in_the_table(slow_library, tiny_model, tmp_path):
    index, mark = tmp_path / "idx", tmp_path / "slow.pid"
    args = [a for a in ingest_args(slow_library, index, tiny_model) if a != "--json"]
    proc = start(args, mark)
    wait_for(mark.exists, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "interrupted:" in out.decode() and "added" in out.decode()
    assert "next ingest resumes" in err.decode()


def test_embed_leaves_no_partial_output(slow_library, tiny_model, tmp_path):
    output, mark = tmp_path / "out" / "features.parquet", tmp_path / "slow.pid"
    args = ["embed", slow_library, "-o", output, "--model", tiny_model, "--device", "cpu", "--workers", "2"]

    proc = start(args, mark)  # SIGKILL: the staging folder stays, until the next embed to that output
    wait_for(mark.exists, proc)
    proc.kill()
    proc.wait()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".features.parquet.")]
    assert gone_within(proc.pid, 2.0) == []

    mark.unlink()
    proc = start(args, mark)  # SIGTERM: clean exit, nothing written, the earlier leftover removed
    wait_for(mark.exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err.decode()
    assert "nothing was written" in err.decode() and "resume" not in err.decode()
    assert list(output.parent.iterdir()) == []
