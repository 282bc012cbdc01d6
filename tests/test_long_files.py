"""A long file in ingest: its progress moves within it, and its finished segments survive an interrupt.

A 2-hour file is one file of ~700 segments: the bar must move while it is embedded, and
an interrupt must not throw away the segments already embedded. The chunk size is made
small here (PARTIAL_SEGMENTS = 4) so that a 2-minute file stands for a long one.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from audiosearch import ingest as ingest_module
from audiosearch import synthetic as syn
from audiosearch.ingest import ingest
from audiosearch.interrupts import Interrupted
from audiosearch.render import IngestBar

from .conftest import write


class Recorder:
    """A Progress that counts segments as they come and can stop the run after some."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.new, self.shares, self.files = stop_after, 0, [], 0

    def start(self, files: int) -> None:
        pass

    def advance(self, path: str, new: int, done: int, total: int) -> None:
        self.new += new
        self.shares.append(done / total)
        if self.stop_after is not None and done >= self.stop_after:
            raise KeyboardInterrupt

    def update(self, result) -> None:
        self.files += 1


@pytest.fixture()
def long_library(tmp_path) -> Path:
    x = np.concatenate([syn.melody(60, seed=3), syn.bursts(63, seed=4)])  # 123 s: 12 segments
    write(tmp_path / "lib" / "long.wav", x, 16000)
    write(tmp_path / "lib" / "short.wav", syn.tone(440, 3), 16000)
    return tmp_path / "lib"


def rows(index: Path) -> tuple[list, list, list]:
    with sqlite3.connect(index / "audiosearch.db") as db:
        segs = db.execute("SELECT path, start, \"end\", vector, scores FROM segments JOIN files ON files.id = file_id "
                          "ORDER BY path, start").fetchall()
        prints = db.execute("SELECT path, data FROM fingerprints JOIN files ON files.id = file_id ORDER BY path").fetchall()
        partial = db.execute("SELECT start FROM partial_segments ORDER BY start").fetchall()
    return segs, prints, partial


def run(library: Path, index: Path, model: Path, progress) -> None:
    ingest([library], index_dir=index, model=str(model), device="cpu", precision="fp32", batch_size=2,
           workers=0, progress=progress)


def test_an_interrupted_long_file_resumes_from_its_committed_segments(long_library, tiny_model, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(ingest_module, "PARTIAL_SEGMENTS", 4)
    index = tmp_path / "index"
    first = Recorder(stop_after=9)
    with pytest.raises(Interrupted):
        run(long_library, index, tiny_model, first)
    segs, prints, partial = rows(index)
    long_path = str(long_library / "long.wav")
    assert not any(path == long_path for path, *_ in segs)  # not searchable before it is whole
    assert len(partial) == 8  # two chunks of 4 committed before the interrupt

    again = Recorder()
    run(long_library, index, tiny_model, again)
    assert again.new == 12 - 8 + 1  # the long file's 4 remaining segments and the short file's one
    assert again.shares[0] > 8 / 12  # the bar starts where the file stopped

    clean = tmp_path / "clean"
    run(long_library, clean, tiny_model, Recorder())
    resumed, clean_rows = rows(index), rows(clean)
    assert resumed[0] == clean_rows[0]  # same ranges, vectors and scores, bit for bit
    assert resumed[1] == clean_rows[1]  # the fingerprint is the whole file's
    assert resumed[2] == [] and len(resumed[0]) == 13


def test_the_bar_moves_within_a_long_file(long_library, tiny_model, tmp_path, monkeypatch):
    console = Console(file=io.StringIO(), width=80)
    seen = []
    with IngestBar(console) as bar:
        real = bar.advance

        def watch(path, new, done, total):
            real(path, new, done, total)
            seen.append((bar.progress.tasks[0].completed, bar.segments))

        bar.advance = watch
        run(long_library, tmp_path / "index", tiny_model, bar)
        assert bar.progress.tasks[0].completed == 2 and bar.segments == 13
    fractions = [c for c, _ in seen if 0 < c % 1]
    assert len(fractions) >= 4 and fractions == sorted(fractions)  # moved in steps before the file was done


def test_a_long_query_clip_reports_its_segments(tiny_model, long_library, tmp_path):
    """`query` follows a long clip's segments through the model (the CLI shows them as a bar on stderr)."""
    from audiosearch.query import query_clips

    index = tmp_path / "index"
    run(long_library, index, tiny_model, Recorder())
    seen = []

    class Follow:
        def update(self, clip, done, total):
            seen.append((clip, done, total))

    (result,) = query_clips([long_library / "long.wav"], index_dir=index, model=str(tiny_model), device="cpu",
                            progress=Follow())
    assert result.query_segments == 12
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and seen[-1][1:] == (12, 12)
    assert len(seen) >= 2 and {c for c, _, _ in seen} == {str(long_library / "long.wav")}
