"""Ingest onto a full filesystem (a 4 MiB tmpfs, filled to several levels): one line, a consistent index, and a
complete next run once space is freed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.doctor import doctor

from .conftest import write

FREE_BYTES = [0, 16 << 10, 100 << 10, 400 << 10]  # left free when ingest starts


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("a small tmpfs needs root (mount -t tmpfs)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as f:
        while size > 0:
            try:
                size -= f.write(b"\0" * min(size, 1 << 20))
            except OSError:
                break
    return filler


def test_full_disk_is_one_line_and_the_next_run_completes(small_disk, tiny_model, tmp_path):
    lib = tmp_path / "lib"
    for i in range(16):
        write(lib / f"{i:02d}.wav", syn.tone(200 + 30 * i, 12.0) if i % 2 else syn.noise(3.0, seed=i), 16000)
    runner = CliRunner()
    outcomes = []
    for n, leave in enumerate(FREE_BYTES):
        index = small_disk / f"idx{n}"
        filler = fill(small_disk, leave)
        args = ["ingest", str(lib), "--index", str(index), "--model", str(tiny_model), "--device", "cpu"]
        result = runner.invoke(app, args)
        assert "Traceback" not in result.output, result.output
        if result.exit_code != 0:
            lines = result.output.strip().splitlines()  # the progress bar (stdout), then the error (stderr)
            assert result.exit_code == 1 and [line.startswith("Error:") for line in lines].count(True) == 1
            assert all(line.startswith(("Error:", "ingest ")) for line in lines), result.output
            assert "full" in result.output or "No space" in result.output, result.output
        outcomes.append(result.exit_code)
        filler.unlink()
        if (index / "audiosearch.db").exists():  # what the failed run left is consistent, doctor says
            report = doctor(index)
            assert not [f for f in report.findings if f.problem and f.check.startswith(("sqlite", "orphan"))]
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["added"] + summary["updated"] + summary["unchanged"] == 16 and not summary["failed"]
        assert doctor(index).ok
        for stale in small_disk.glob(f"idx{n}/.vectors.faiss.*.tmp"):
            pytest.fail(f"left behind: {stale}")
    print("outcomes", outcomes)
    assert outcomes.count(1) >= 3, outcomes  # the levels do fill the disk, at different moments
