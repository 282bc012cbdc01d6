"""A long file in ingest: its progress moves within it, and its finished segments survive an interrupt.

A 2-hour file is one file of ~700 segments: the bar must move while it is embedded, and
an interrupt must not throw away the segments already embedded. The chunk size is made
small here (PARTIAL_SEGMENTS = 4) so that a 2-minute file stands for a long one.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from audiosearch import decode_pool, embedder
from audiosearch import ingest as ingest_module
from audiosearch import synthetic as syn
from audiosearch.audio import SEGMENT_SAMPLES
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


def test_a_file_whose_header_gives_no_length_keeps_its_first_part_across_an_interrupt(
        long_library, tiny_model, tmp_path, monkeypatch):
    """Until its last part the file's length is a guess (one segment more than cut so far): the first
    part's segments are kept for saving all the same, not taken for those of a short file."""
    monkeypatch.setattr(ingest_module, "PARTIAL_SEGMENTS", 8)
    monkeypatch.setattr(decode_pool, "PART_SAMPLES", SEGMENT_SAMPLES)
    real = decode_pool.open_stream

    @contextlib.contextmanager
    def headerless(path):
        with real(path) as stream:
            stream.duration = None
            yield stream

    monkeypatch.setattr(decode_pool, "open_stream", headerless)
    index = tmp_path / "index"
    with pytest.raises(Interrupted):
        run(long_library, index, tiny_model, Recorder(stop_after=9))
    assert len(rows(index)[2]) == 8  # the first segments (cut while the guess was under 8) among them


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


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_handed_over_in_parts_gives_the_whole_files_results(long_library, tiny_model, tmp_path, monkeypatch,
                                                                   workers):
    """A long file reaches the model part by part (bounded memory): the same segments, vectors and
    fingerprint, bit for bit, as when it comes whole."""
    seen = []

    class Counting(decode_pool.DecodePool):
        def map(self, tasks):
            for decoded in super().map(tasks):
                seen.append(decoded.last)
                yield decoded

    monkeypatch.setattr(embedder, "DecodePool", Counting)
    for name, part in (("whole", 0), ("parts", 3 * SEGMENT_SAMPLES + 12_345)):
        monkeypatch.setattr(decode_pool, "PART_SAMPLES", part)
        ingest([long_library], index_dir=tmp_path / name, model=str(tiny_model), device="cpu", precision="fp32",
               batch_size=2, workers=workers, progress=None)
    assert seen.count(False) == 3  # the 123 s file came in 4 parts the second time, whole the first
    whole, parts = rows(tmp_path / "whole"), rows(tmp_path / "parts")
    assert parts[0] == whole[0] and len(whole[0]) == 13 and parts[1] == whole[1]


def test_overlapping_segments_across_parts_are_the_whole_files(long_library, tiny_model, monkeypatch):
    """With a hop shorter than a segment, segments straddle the parts: copied together, the same."""
    from audiosearch import Embedder

    def embed(part: int):
        monkeypatch.setattr(decode_pool, "PART_SAMPLES", part)
        emb = Embedder(str(tiny_model), device="cpu", precision="fp32", batch_size=3, workers=1, hop_seconds=4.0)
        (result,) = emb.embed_files([long_library / "long.wav"])
        return [(s.start, s.end, s.embedding.tobytes()) for s in result.segments]

    whole = embed(0)
    assert embed(2 * SEGMENT_SAMPLES + 777) == whole and len(whole) == 30


def test_a_long_file_damaged_further_in_fails_whole_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """Its first parts were embedded (and their segments committed as partials) when the damage shows:
    the file is reported failed, none of its segments are searchable, and its partials are cleared."""
    monkeypatch.setattr(ingest_module, "PARTIAL_SEGMENTS", 2)
    monkeypatch.setattr(decode_pool, "PART_SAMPLES", 2 * SEGMENT_SAMPLES)
    x = syn.melody(120, seed=5).astype(np.float32)
    x[100 * 16000] = np.nan
    write(tmp_path / "lib" / "damaged.wav", x, 16000, subtype="FLOAT")
    write(tmp_path / "lib" / "fine.wav", syn.tone(440, 3), 16000)
    seen = Recorder()
    summary = ingest([tmp_path / "lib"], index_dir=tmp_path / "index", model=str(tiny_model), device="cpu",
                     precision="fp32", batch_size=2, workers=1, progress=seen)
    assert summary.failed == [(str(tmp_path / "lib" / "damaged.wav"), "audio holds NaN or infinite samples")]
    assert seen.new >= 4  # segments of the damaged file went through the model before the damage was found
    segs, _, partial = rows(tmp_path / "index")
    assert [path for path, *_ in segs] == [str(tmp_path / "lib" / "fine.wav")] and partial == []
