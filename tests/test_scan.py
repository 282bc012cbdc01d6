"""`audiosearch scan`: library audio found inside a long recording, with ranges, speed and pitch.

The recording is made as a user's would be: library files and excerpts among other sounds
and noise, one played faster (sox speed), one pitch-shifted (sox pitch), all through the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.match import Matcher
from audiosearch.match.scan import HOP_SECONDS, WINDOW_SECONDS, merge, scan_blocks, windows

from .conftest import write

runner = CliRunner()
RATE = 16000
SOX = shutil.which("sox")
needs_sox = pytest.mark.skipif(SOX is None, reason="sox is not installed (make setup installs it with apt as root)")


def run(*args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def sox(x: np.ndarray, tmp: Path, *effect: str) -> np.ndarray:
    write(tmp / "in.wav", x, RATE)
    subprocess.run([SOX, str(tmp / "in.wav"), str(tmp / "out.wav"), *effect], check=True, capture_output=True)
    return sf.read(tmp / "out.wav", dtype="float32")[0]


LIBRARY = {
    "long_melody.wav": lambda: syn.melody(30, seed=1),
    "short_melody.wav": lambda: syn.melody(6, seed=5),
    "bursts.wav": lambda: syn.bursts(8, seed=3),
    "tune.flac": lambda: syn.melody(7, seed=8),
}


@pytest.fixture(scope="module")
def scan_setup(tiny_model, tmp_path_factory):
    """A library, its index, and a 100 s recording with four planted occurrences (the truth)."""
    root = tmp_path_factory.mktemp("scan")
    sounds = {name: make() for name, make in LIBRARY.items()}
    for name, x in sounds.items():
        write(root / "lib" / name, x, RATE)
    index = root / "index"
    run("ingest", root / "lib", "--index", index, "--model", tiny_model)
    # other sounds throughout: a melody that is in no library file, and pink noise
    recording = 0.5 * syn.melody(100, seed=77) + syn.noise(100, seed=9, amp=0.02, pink=True)
    truth = []

    def plant(at: float, x: np.ndarray, name: str, file_start: float, file_end: float, speed=1.0, pitch=1.0):
        i = int(at * RATE)
        recording[i:i + len(x)] = x
        truth.append(dict(path=name, start=at, end=at + len(x) / RATE, file_start=file_start, file_end=file_end,
                          speed=speed, pitch=pitch))

    plant(8, sounds["short_melody.wav"], "short_melody.wav", 0, 6)
    plant(30, sox(sounds["bursts.wav"], root, "speed", "1.06"), "bursts.wav", 0, 8, speed=1.06, pitch=1.06)
    plant(52, sox(sounds["tune.flac"], root, "pitch", "200"), "tune.flac", 0, 7, pitch=2 ** (2 / 12))
    plant(75, sounds["long_melody.wav"][5 * RATE:13 * RATE], "long_melody.wav", 5, 13)
    write(root / "recording.wav", recording, RATE)
    return index, root / "recording.wav", truth


@needs_sox
def test_scan_finds_every_planted_occurrence_and_nothing_else(scan_setup):
    index, recording, truth = scan_setup
    data = json.loads(run("scan", recording, "--index", index, "--json"))
    found = data["occurrences"]
    assert data["format_version"] == 1 and data["duration"] == pytest.approx(100, abs=0.01)
    assert [Path(o["path"]).name for o in found] == [t["path"] for t in truth], found
    for o, t in zip(found, truth):
        assert o["speed"] == pytest.approx(t["speed"], abs=0.01) and o["pitch"] == pytest.approx(t["pitch"], abs=0.01)
        assert o["score"] > 0.5
        for key in ("start", "end", "file_start", "file_end"):
            assert o[key] == pytest.approx(t[key], abs=0.1 * (1 + (t["file_start"] > 0) * 2.5)), (key, o, t)


@needs_sox
def test_scan_within_a_minute_of_sound_is_exact_to_a_tenth_of_a_second(scan_setup):
    """Whole files planted (plain, faster, pitch-shifted): both ends within 0.1 s."""
    index, recording, truth = scan_setup
    found = json.loads(run("scan", recording, "--index", index, "--json"))["occurrences"]
    for o, t in zip(found[:3], truth[:3]):
        assert abs(o["start"] - t["start"]) <= 0.1 and abs(o["end"] - t["end"]) <= 0.1, (o, t)


def test_scan_table_csv_and_min_seconds(scan_setup, monkeypatch):
    index, recording, truth = scan_setup
    monkeypatch.setenv("COLUMNS", "80")
    piped = run("scan", recording, "--index", index)
    rows = [line.split("\t") for line in piped.strip().splitlines()]
    assert rows[0][:3] == ["start", "end", "path"] and len(rows) == 1 + len(truth)
    table = list(csv.reader(io.StringIO(run("scan", recording, "--index", index, "--csv"))))
    assert table[0][0] == "start" and len(table) == 1 + len(truth)
    assert float(table[1][0]) == pytest.approx(truth[0]["start"], abs=0.1)
    longer = json.loads(run("scan", recording, "--index", index, "--json", "--min-seconds", "7.5"))["occurrences"]
    assert {Path(o["path"]).name for o in longer} == {"bursts.wav", "long_melody.wav"}


def test_scan_similar_lists_library_sounds_for_every_segment_without_an_occurrence(scan_setup):
    index, recording, _ = scan_setup
    data = json.loads(run("scan", recording, "--index", index, "--json", "--similar", "2"))
    spans = [(o["start"], o["end"]) for o in data["occurrences"]]
    free = [n * 10.24 for n in range(10) if not any(a < min(100, (n + 1) * 10.24) and b > n * 10.24 for a, b in spans)]
    assert 0 < len(free) < 10
    assert [s["start"] for s in data["similar"]] == pytest.approx(free)
    for stretch in data["similar"]:
        assert 1 <= len(stretch["hits"]) <= 2 and stretch["labels"]
        assert all(h["match"] == {"kind": "similar"} for h in stretch["hits"])
    assert "similar" not in json.loads(run("scan", recording, "--index", index, "--json"))
    piped = run("scan", recording, "--index", index, "--similar", "1").strip().splitlines()
    header = piped.index("\t".join(["start", "end", "rank", "path", "similarity", "labels"]))
    assert len(piped) - header - 1 == len(data["similar"])


def test_scan_of_unrelated_audio_finds_nothing(scan_setup, tmp_path):
    index, _, _ = scan_setup
    clip = write(tmp_path / "other.wav", 0.5 * syn.melody(40, seed=123) + syn.noise(40, seed=4, amp=0.05), RATE)
    assert json.loads(run("scan", clip, "--index", index, "--json"))["occurrences"] == []
    out = run("scan", tmp_path, "--index", index, code=1)
    assert "is a folder, not a recording" in out


def test_windows_overlap_and_cover_the_stream_once():
    """Windows of WINDOW_SECONDS every HOP_SECONDS, the last one ending with the stream, from blocks of any size."""
    x = np.arange(int(37.3 * RATE), dtype=np.float32)
    blocks = [x[i:i + 7777] for i in range(0, len(x), 7777)]
    got = list(windows(iter(blocks)))
    starts = [start for start, _ in got]
    assert starts == [0.0, HOP_SECONDS, 2 * HOP_SECONDS, 3 * HOP_SECONDS]
    for start, w in got:
        np.testing.assert_array_equal(w, x[int(start * RATE):int(start * RATE) + len(w)])
    assert len(got[0][1]) == WINDOW_SECONDS * RATE and got[-1][1][-1] == x[-1]
    assert [len(w) for _, w in windows(iter([x[:RATE]]))] == [RATE]


def test_matches_that_continue_each_other_merge_into_one(scan_setup):
    from audiosearch.match.scan import Occurrence

    a = Occurrence(1, "f", 10.0, 20.0, 0.0, 10.5, 1.05, 1.0, 1.0, 50)
    b = Occurrence(1, "f", 19.0, 27.0, 9.45, 17.85, 1.05, 1.0, 0.8, 30)
    elsewhere = Occurrence(1, "f", 40.0, 45.0, 0.0, 5.0, 1.0, 1.0, 1.0, 20)  # the file again, from its start
    other = Occurrence(2, "g", 19.0, 27.0, 9.45, 17.85, 1.05, 1.0, 0.8, 30)
    merged = merge([b, elsewhere, a, other])
    assert [(o.file_id, o.start, o.end) for o in merged] == [(1, 10.0, 27.0), (2, 19.0, 27.0), (1, 40.0, 45.0)]
    assert merged[0].file_end == 17.85 and merged[0].inliers == 80


SCAN_MEMORY = """
import re, sys
import numpy as np
from audiosearch.match import Matcher
from audiosearch.match.scan import scan_blocks
from audiosearch import synthetic as syn

def blocks(minutes):
    x = 0.5 * syn.melody(60, seed=77) + syn.noise(60, seed=9, amp=0.02, pink=True)
    for _ in range(minutes):
        for i in range(0, len(x), 65536):
            yield x[i:i + 65536]

with Matcher.open(sys.argv[1]) as m:
    found = scan_blocks(m, blocks(int(sys.argv[2])))
print(len(found), re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def test_scan_memory_stays_flat_over_a_long_recording(scan_setup):
    """Peak memory of scanning 30 minutes is within 20 MB of scanning 2 (the whole 30 minutes would be 115 MB)."""
    index, _, _ = scan_setup
    peaks = []
    for minutes in (2, 30):
        p = subprocess.run([sys.executable, "-c", SCAN_MEMORY, str(index), str(minutes)], capture_output=True,
                           text=True, check=True)
        found, kib = map(int, p.stdout.split())
        assert found == 0
        peaks.append(kib / 1024)
    assert peaks[1] - peaks[0] < 20, peaks
