"""`audiosearch dupes`: planted duplicates in a generated library come back grouped, with their ranges.

Edits are made as users make them: sox for speed and pitch, soundfile for an
MP3 re-encode, numpy for gain and cuts. A similar but different sound (the
same generator, another seed) must not be reported as a duplicate.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from rich.console import Console
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.match.dupes import DupeFile, RareKeys, find_dupes, keep_reason, match_pair, sampled_keys
from audiosearch.match.fingerprint import fingerprint, keys, query_keys, triplets
from audiosearch.match.lookup import PrintLookup, entries_of, sorted_run
from audiosearch.render import print_dupes

from .conftest import write

runner = CliRunner()
SOX = shutil.which("sox")
needs_sox = pytest.mark.skipif(SOX is None, reason="sox is not installed (make setup installs it with apt as root)")
RATE = 16000


def run(*args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def sox(src: Path, dst: Path, *effect: str) -> Path:
    """A 16-bit copy of `src` under a sox effect."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([SOX, str(src), "-b", "16", str(dst), *effect], check=True, capture_output=True)
    return dst


def cut(src: Path, start: float, end: float, dst: Path, **options) -> Path:
    data, rate = sf.read(src, dtype="float32")
    return write(dst, data[int(start * rate):int(end * rate)], rate, **options)


# What is planted, under the library root: (copy, original, kind, copy's range, original's range, speed, pitch).
PLANTED = [
    ("copies/melody_a.mp3", "melody_a.wav", "whole", (0, 30), (0, 30), 1.0, 1.0),
    ("copies/melody_a_fast.wav", "melody_a.wav", "whole", (0, 30 / 1.05), (0, 30), 1.05, 1.05),
    ("copies/melody_a_up.wav", "melody_a.wav", "whole", (0, 30), (0, 30), 1.0, 2 ** (2 / 12)),
    ("cuts/melody_a_cut.wav", "melody_a.wav", "contained", (0, 12), (8, 20), 1.0, 1.0),
    ("bursts_b_quiet.wav", "bursts_b.flac", "whole", (0, 25), (0, 25), 1.0, 1.0),
    ("overlap_2.wav", "overlap_1.wav", "partial", (0, 8), (12, 20), 1.0, 1.0),
]


@pytest.fixture(scope="module")
def dupes_library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dupeslib")
    original = write(root / "melody_a.wav", syn.melody(30, seed=11, rate=44100), 44100, subtype="PCM_24")
    data, _ = sf.read(original, dtype="float32")
    write(root / "copies" / "melody_a.mp3", data, 44100, format="MP3")
    sox(original, root / "copies" / "melody_a_fast.wav", "speed", "1.05")
    sox(original, root / "copies" / "melody_a_up.wav", "pitch", "200")
    cut(original, 8, 20, root / "cuts" / "melody_a_cut.wav", subtype="PCM_16")
    bursts = syn.bursts(25, seed=12, rate=48000)
    write(root / "bursts_b.flac", bursts, 48000, subtype="PCM_24")
    write(root / "bursts_b_quiet.wav", 0.3 * soxr.resample(bursts, 48000, RATE), RATE)  # resampled, quieter
    shared = syn.melody(30, seed=13)
    write(root / "overlap_1.wav", shared[:20 * RATE], RATE)
    write(root / "overlap_2.wav", shared[12 * RATE:], RATE)
    write(root / "melody_f.wav", syn.melody(30, seed=14), RATE)  # similar, but another recording
    write(root / "bursts_g.wav", syn.bursts(20, seed=15), RATE)
    return root


@pytest.fixture(scope="module")
def dupes_index(dupes_library, tiny_model, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("dupesindex") / "idx"
    run("ingest", dupes_library, "--index", index, "--model", tiny_model)
    return index


def _pairs(report_json: dict) -> dict[frozenset, dict]:
    return {frozenset((Path(p["a"]).name, Path(p["b"]).name)): p for g in report_json["groups"] for p in g["pairs"]}


# -- the library function ---------------------------------------------------------------------


@needs_sox
def test_planted_duplicates_come_back_grouped_with_ranges_speed_and_pitch(dupes_index, dupes_library):
    data = json.loads(run("dupes", "--index", dupes_index, "--json"))
    pairs = _pairs(data)
    for copy, original, kind, copy_range, orig_range, speed, pitch in PLANTED:
        p = pairs.get(frozenset((Path(copy).name, Path(original).name)))
        assert p is not None, f"{copy} not found as a duplicate of {original}"
        assert p["kind"] == kind, (copy, p)
        # `a` is the file to keep; here always the original, so the copy's range is b's
        assert Path(p["a"]).name == Path(original).name, p
        assert p["b_start"] == pytest.approx(copy_range[0], abs=0.5) and p["b_end"] == pytest.approx(copy_range[1], abs=0.5)
        assert p["a_start"] == pytest.approx(orig_range[0], abs=0.5) and p["a_end"] == pytest.approx(orig_range[1], abs=0.5)
        assert p["speed"] == pytest.approx(speed, abs=0.01) and p["pitch"] == pytest.approx(pitch, abs=0.01), p
    groups = {frozenset(Path(f["path"]).name for f in g["files"]): g for g in data["groups"]}
    melody = groups[frozenset(["melody_a.wav", "melody_a.mp3", "melody_a_fast.wav", "melody_a_up.wav",
                               "melody_a_cut.wav"])]
    assert Path(melody["keep"]).name == "melody_a.wav" and melody["reason"] == "more bits per sample (24 vs 16)"
    bursts = groups[frozenset(["bursts_b.flac", "bursts_b_quiet.wav"])]
    assert Path(bursts["keep"]).name == "bursts_b.flac" and "sample rate (48000 vs 16000 Hz)" in bursts["reason"]
    assert frozenset(["overlap_1.wav", "overlap_2.wav"]) in groups
    assert len(groups) == 3  # melody_f and bursts_g are in no group: similar sounds, other recordings
    assert not any("melody_f" in f["path"] or "bursts_g" in f["path"] for g in data["groups"] for f in g["files"])


def test_a_pair_is_the_same_found_from_either_side():
    a = syn.melody(20, seed=21)
    b = np.concatenate([syn.bursts(5, seed=22), a[4 * RATE:16 * RATE], syn.bursts(6, seed=23)])
    fa, fb = fingerprint(a), fingerprint(b)
    ab, ba = match_pair(1, fa, 2, fb), match_pair(2, fb, 1, fa)
    assert ab == ba and ab.kind == "contained" and ab.inner == 1 or ab.kind == "partial"
    assert ab.a_start == pytest.approx(4, abs=0.3) and ab.a_end == pytest.approx(16, abs=0.3)
    assert ab.b_start == pytest.approx(5, abs=0.3) and ab.b_end == pytest.approx(17, abs=0.3)
    assert match_pair(1, fa, 3, fingerprint(syn.melody(20, seed=24))) is None


def test_discovery_probes_one_key_in_four_with_the_probes_own_indices():
    prints = {i: fingerprint(syn.melody(20, seed=30 + i)) for i in (1, 2, 3)}
    parts = [entries_of(i, fp) for i, fp in prints.items()]
    lookup = PrintLookup([sorted_run(np.array(sorted(prints)), [k for k, _ in parts], [e for _, e in parts])])
    probe_keys, _ = query_keys(triplets(prints[2]), False)
    stored = keys(triplets(prints[1]), False)
    assert 0.2 < sampled_keys(stored, 4).mean() < 0.3 and sampled_keys(stored, 1).all()
    assert sampled_keys(keys(triplets(fingerprint(syn.tone(880, 0.3))), True), 4).all()  # a blip's keys: all

    seen = []
    probe, entries = RareKeys(lookup, 4096, sample=4).lookup(
        probe_keys, keep=lambda p, ordinal, ms: seen.append(p) or np.ones(len(p), bool))
    every_probe, every_entries = RareKeys(lookup, 4096).lookup(probe_keys)
    assert len(probe) > 0 and sampled_keys(probe_keys[probe], 4).all()
    assert np.array_equal(np.concatenate(seen), probe)  # keep() sees indices into the caller's probe keys
    wanted = sampled_keys(probe_keys[every_probe], 4)
    got = sorted(zip(probe.tolist(), entries.tolist()))
    assert got == sorted(zip(every_probe[wanted].tolist(), every_entries[wanted].tolist()))


def test_keeper_rules_in_order():
    def f(path, fmt="WAV", sub="PCM_16", rate=44100, dur=10.0):
        return DupeFile(1, path, dur, rate, 1, fmt, sub)

    assert "lossless (FLAC) over lossy (MP3)" == keep_reason(f("x.flac", "FLAC"), f("x.mp3", "MP3", "MPEG_LAYER_III"))
    assert keep_reason(f("b.wav", sub="PCM_24"), f("a.wav")) == "more bits per sample (24 vs 16)"
    assert keep_reason(f("b.wav", dur=12), f("a.wav")) == "longer (12.0 vs 10.0 s)"
    ranked = sorted([f("b.wav"), f("a.mp3", "MP3", "MPEG_LAYER_III", 48000), f("a.wav")], key=DupeFile.rank)
    assert [x.path for x in ranked] == ["a.wav", "b.wav", "a.mp3"]


# -- incremental ------------------------------------------------------------------------------


@needs_sox
def test_incremental_after_adding_and_deleting_equals_a_full_run(dupes_library, tiny_model, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(dupes_library, lib)
    moved = tmp_path / "later"
    moved.mkdir()
    for name in ("melody_a_cut.wav", "melody_a_fast.wav"):  # added later: one contained, one whole copy
        shutil.move(next(lib.rglob(name)), moved / name)
    index = tmp_path / "idx"
    run("ingest", lib, "--index", index, "--model", tiny_model)
    first = json.loads(run("dupes", "--index", index, "--json"))
    assert first["stats"]["matched"] == first["stats"]["fingerprints"]
    for name in ("melody_a_cut.wav", "melody_a_fast.wav"):
        shutil.move(moved / name, lib / name)
    # a new file that contains an old one (which must be found although the old file is not matched again)
    data, rate = sf.read(lib / "overlap_1.wav", dtype="float32")
    write(lib / "long_take.wav", np.concatenate([syn.bursts(6, seed=31), data, syn.bursts(5, seed=32)]), rate)
    (lib / "bursts_b_quiet.wav").unlink()
    run("ingest", lib, "--index", index, "--model", tiny_model)
    incremental = json.loads(run("dupes", "--index", index, "--json"))
    assert incremental["stats"]["matched"] == 3 and incremental["stats"]["forgotten"] == 1
    full = json.loads(run("dupes", "--index", index, "--json", "--full"))
    assert full["stats"]["matched"] == full["stats"]["fingerprints"]
    assert incremental["groups"] == full["groups"]
    pairs = _pairs(full)
    assert frozenset(("overlap_1.wav", "long_take.wav")) in pairs
    assert pairs[frozenset(("overlap_1.wav", "long_take.wav"))]["kind"] == "contained"
    assert frozenset(("melody_a_cut.wav", "melody_a.wav")) in pairs
    assert not any("bursts_b" in f["path"] for g in full["groups"] for f in g["files"])  # its copy was deleted
    again = json.loads(run("dupes", "--index", index, "--json"))
    assert again["stats"]["matched"] == 0 and again["groups"] == full["groups"]


def test_dupes_leaves_the_generation_and_derived_files_current(dupes_index):
    from audiosearch.collection import collection_info

    before = collection_info(dupes_index)
    run("dupes", "--index", dupes_index, "--json")
    after = collection_info(dupes_index)
    assert after["index_current"] and after["fingerprints"]["lookup_current"]
    assert before["fingerprints"] == after["fingerprints"]


# -- the command line ---------------------------------------------------------------------------


@needs_sox
def test_cli_table_tsv_csv_kind_min_seconds_and_label(dupes_index):
    tsv = [line.split("\t") for line in run("dupes", "--index", dupes_index).splitlines()]
    assert tsv[0][:5] == ["group", "kind", "path", "start", "end"] and len({len(r) for r in tsv}) == 1
    assert {r[1] for r in tsv[1:]} == {"whole", "contained", "partial"}
    rows = list(csv.DictReader(io.StringIO(run("dupes", "--index", dupes_index, "--csv"))))
    assert len(rows) == len(tsv) - 1 and all(r["keep"] for r in rows)
    whole = list(csv.DictReader(io.StringIO(run("dupes", "--index", dupes_index, "--csv", "--kind", "whole"))))
    assert whole and {r["kind"] for r in whole} == {"whole"}
    longer = json.loads(run("dupes", "--index", dupes_index, "--json", "--min-seconds", "10"))
    kinds = {p["kind"] for g in longer["groups"] for p in g["pairs"]}
    assert "partial" not in kinds and "contained" in kinds  # the 8 s overlap is gone, the 12 s cut is not
    labelled = json.loads(run("dupes", "--index", dupes_index, "--json", "--label", "Music"))
    everything = json.loads(run("dupes", "--index", dupes_index, "--json"))
    assert 0 < sum(len(g["pairs"]) for g in labelled["groups"]) < sum(len(g["pairs"]) for g in everything["groups"])
    out = run("dupes", "--index", dupes_index, "--label", "No such label at all", code=1)
    assert "unknown label" in out
    assert "unknown --kind" in run("dupes", "--index", dupes_index, "--kind", "twins", code=1)


@needs_sox
def test_table_groups_pairs_under_their_keeper(dupes_index):
    buf = io.StringIO()
    print_dupes(Console(file=buf, width=100, force_terminal=True, color_system=None), find_dupes(dupes_index))
    text = buf.getvalue()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "group 1: 5 files, keep …/" in text and "/melody_a.wav (more bits per sample (24 vs 16))" in text
    assert text.count("whole copy") == 4  # one row per file besides the keeper (piped output lists every pair)
    assert "whole copy" in text and "inside" in text and "+2.0 st" in text and "×1.05 +0." in text


def test_similar_pairs_are_marked_similar_never_duplicate(dupes_index):
    data = json.loads(run("dupes", "--index", dupes_index, "--json", "--similar", "0.5"))
    assert data["similar"] and all(s["kind"] == "similar" and s["cosine"] >= 0.5 for s in data["similar"])
    verified = set(_pairs(data))
    assert not verified & {frozenset((Path(s["a"]).name, Path(s["b"]).name)) for s in data["similar"]}
    assert any("melody_f.wav" in (s["a"] + s["b"]) for s in data["similar"])
    rows = list(csv.DictReader(io.StringIO(run("dupes", "--index", dupes_index, "--csv", "--similar", "0.5"))))
    assert any(r["kind"] == "similar" and not r["group"] for r in rows)
