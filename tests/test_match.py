"""The matching stage: fingerprints, the print lookup index, verification, and `query` with duplicates.

Edits are made as users make them, with sox (speed, pitch) and by mixing noise in;
a similar but different sound (same generator, another seed) must not be a duplicate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.match import Matcher
from audiosearch.match import lookup as L
from audiosearch.match import fingerprint as F
from audiosearch.match.fingerprint import (VERSION, Fingerprint, fingerprint, keys, query_keys, triplets)

from .conftest import write

runner = CliRunner()
RATE = 16000
SOX = shutil.which("sox")
needs_sox = pytest.mark.skipif(SOX is None, reason="sox is not installed (make setup installs it with apt as root)")


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def sox(src: Path, dst: Path, *effect: str) -> Path:
    subprocess.run([SOX, str(src), str(dst), *effect], check=True, capture_output=True)
    return dst


def excerpt(path: Path, start: float, seconds: float, out: Path) -> Path:
    data, rate = sf.read(path, dtype="float32")
    return write(out, data[int(start * rate): int((start + seconds) * rate)], rate)


@pytest.fixture(scope="module")
def match_library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matchlib")
    write(root / "melody_a.wav", syn.melody(30, seed=1, rate=44100), 44100)
    write(root / "melody_b.flac", syn.melody(25, seed=2, rate=22050), 22050)
    write(root / "bursts_a.wav", syn.bursts(20, seed=3), RATE)
    write(root / "bursts_b.wav", syn.bursts(20, seed=4), RATE)
    write(root / "click.wav", syn.bursts(0.3, seed=5), RATE)
    write(root / "tick.wav", syn.bursts(0.12, seed=6), RATE)
    return root


@pytest.fixture(scope="module")
def match_index(match_library, tiny_model, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("matchindex") / "idx"
    run("ingest", match_library, "--index", index, "--model", tiny_model)
    return index


def query(index: Path, model: Path, clip: Path, *extra: str) -> list[dict]:
    return json.loads(run("query", clip, "--index", index, "--model", model, "--json", *extra))["hits"]


# -- fingerprints and keys ------------------------------------------------------------------


def test_fingerprint_round_trips_through_bytes():
    fp = fingerprint(syn.melody(5, seed=0))
    back = Fingerprint.from_bytes(fp.to_bytes())
    assert len(fp) > 20 and len(back) == len(fp)
    assert np.abs(back.times - fp.times).max() <= 0.0005
    assert np.abs(back.bands - fp.bands).max() <= 1 / 64
    assert back.duration == fp.duration and back.short == fp.short


def test_every_stored_key_is_among_its_own_probes():
    """A query with exactly the library's triplets must probe every cell they are stored in."""
    fp = fingerprint(syn.bursts(8, seed=9))
    tr = triplets(fp)
    stored = keys(tr, fp.short)
    probes, rows = query_keys(tr, fp.short)
    assert len(tr) > 50
    assert all(stored[i] in set(probes[rows == i]) for i in range(len(tr)))


@pytest.mark.parametrize("res", [F.LONG, F.SHORT], ids=["long", "short"])
def test_peak_neighbourhoods_are_ndimage_maximum_filter(res):
    """`_max_filter` stands in for ndimage's (4x faster): the same maxima, edges included, ties kept."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spec = np.round(rng.normal(size=(37, F.N_BANDS)), 1).astype(np.float32)  # rounded: many ties
    expected = ndimage.maximum_filter(spec, size=(2 * res.time_radius + 1, 2 * res.band_radius + 1), mode="nearest")
    assert np.array_equal(F._max_filter(spec, res.time_radius, res.band_radius), expected)


def test_gain_changes_no_peak():
    x = syn.melody(6, seed=3)
    a, b = fingerprint(x), fingerprint(x * 0.3)
    assert np.array_equal(a.times, b.times) and np.allclose(a.bands, b.bands)


def test_a_very_short_sound_gets_a_fingerprint():
    fp = fingerprint(syn.bursts(0.08, seed=2))
    assert fp.short and len(fp) >= 3


# -- the lookup index ------------------------------------------------------------------------


class Prints:
    """An in-memory PrintSource."""

    def __init__(self, signals: dict[int, np.ndarray]):
        self.data = {i: fingerprint(x).to_bytes() for i, x in signals.items()}

    def print_ids(self):
        return np.array(sorted(self.data), dtype=np.int64)

    def iter_prints(self, ids, batch_size=512):
        yield [(int(i), VERSION, self.data[int(i)]) for i in ids]


def test_lookup_sync_adds_masks_and_merges(tmp_path):
    source = Prints({i: syn.melody(4, seed=i) for i in range(1, 4)})
    lookup = L.PrintLookup()
    assert lookup.sync(source).added == 3
    del source.data[2]
    source.data[7] = fingerprint(syn.melody(4, seed=7)).to_bytes()
    report = lookup.sync(source)
    assert (report.added, report.removed) == (1, 1)
    assert set(lookup.covered()) == {1, 3, 7}
    probes, rows = query_keys(triplets(fingerprint(syn.melody(4, seed=2))), False)
    _, entries = lookup.lookup(probes)
    assert 2 not in set(entries["fp"])  # masked
    merged = L.merge_runs(lookup.runs, lookup.masked)
    assert set(merged.ids) == {1, 3, 7} and 2 not in set(merged.unpack(merged.entries)["fp"])
    assert np.all(np.diff(merged.keys.astype(np.int64)) >= 0)


def test_packed_entries_keep_what_verification_reads():
    """8-byte entries: ids, times and spans exactly (every peak lies on an 8 ms grid), bands within
    a tenth of one; a triplet past the 37 h a run can place is left out, not placed wrongly."""
    fp = fingerprint(syn.melody(6, seed=4))
    keys_, entries = L.entries_of(123456789, fp)
    run = L.sorted_run(np.array([5, 123456789], dtype=np.int64), [keys_], [entries])
    assert run.entries.dtype == L.PACKED and len(run) == len(entries)
    back = np.sort(run.unpack(run.entries), order=["ms", "span", "band"])
    entries = np.sort(entries, order=["ms", "span", "band"])
    assert np.all(back["fp"] == 123456789)
    assert np.array_equal(back["ms"], entries["ms"]) and np.array_equal(back["span"], entries["span"])
    assert np.abs(back["band"].astype(int) - entries["band"]).max() <= 0.1 * 64
    late = entries[:3].copy()
    late["ms"] = [L.MAX_INDEXED_MS, L.MAX_INDEXED_MS + 8, 10**10 // 3]
    assert len(L.sorted_run(np.array([123456789]), [keys_[:3]], [late])) == 1


def test_plausible_keeps_every_collision_of_every_candidate():
    """The pre-filter may keep too much, never too little: each file that `align` could verify
    (enough collisions at one lag) keeps all its collisions, at any lag; chance ones mostly go."""
    from audiosearch.match.verify import _consistent_counts, lag_bins, plausible
    rng = np.random.default_rng(0)
    files = rng.integers(0, 200_000, 300_000)
    lags = rng.uniform(-20, 60, len(files))
    planted = []  # copies: 14 collisions around one lag (some straddling a bin edge), plus strays
    for i, at in enumerate(rng.uniform(-5, 40, 40)):
        f = 500_000 + i
        planted.append((f, at + rng.normal(0, 0.3, 14 + i % 3), rng.uniform(-20, 60, 5)))
    group = np.concatenate([files] + [np.full(len(a) + len(b), f) for f, a, b in planted])
    lag = np.concatenate([lags] + [np.concatenate([a, b]) for _, a, b in planted])
    lag_bin = lag_bins(np.round((lag + 30) * 1000), np.full(len(lag), 30_000))  # library ms >= 0, as stored
    kept = plausible(group, lag_bin, 14)
    by_file = np.argsort(group, kind="stable")
    ids, counts = _consistent_counts(group[by_file], lag_bin[by_file])
    must = np.isin(group, ids[counts >= 14])
    assert must.sum() >= 40 * 19 and np.all(kept[must])
    assert kept.mean() < 0.01


def test_matching_through_the_pre_filter_finds_what_matching_without_it_finds():
    source = Prints({i: syn.melody(20, seed=i) for i in range(1, 6)})
    index = L.PrintLookup()
    index.sync(source)
    clip = syn.melody(20, seed=3)[RATE * 4: RATE * 14]
    noisy = clip + np.random.default_rng(1).normal(0, 0.1 * clip.std(), len(clip)).astype(np.float32)
    query = fingerprint(noisy, density=F.QUERY_DENSITY)

    class Unfiltered:
        def lookup(self, probe_keys, keep=None):
            return index.lookup(probe_keys)

    from audiosearch.match.matcher import match_fingerprint
    filtered, unfiltered = match_fingerprint(index, query), match_fingerprint(Unfiltered(), query)
    assert filtered and filtered[0].fp_id == 3 and filtered == unfiltered


def test_a_dense_run_finds_what_a_sorted_one_finds(tmp_path, monkeypatch):
    source = Prints({i: syn.melody(6, seed=i) for i in range(1, 5)})
    monkeypatch.setattr(L, "KEY_BITS", 16)  # a small bucket table (the real one is 512 MiB): same layout
    monkeypatch.setattr(L, "keys", lambda tr, short: keys(tr, short) & 0xFFFF)
    sparse = L.PrintLookup()
    sparse.sync(source)
    monkeypatch.setattr(L, "DENSE_ENTRIES", 1)
    dense = L.PrintLookup()
    dense.sync(source)
    assert dense.runs[0].offsets is not None and len(dense.runs[0].keys) == 0
    L.save(dense, tmp_path)
    dense = L.load(tmp_path, verify=True)
    probes, _ = query_keys(triplets(fingerprint(syn.melody(6, seed=2), density=2)), False)
    probes &= 0xFFFF
    (p1, e1), (p2, e2) = sparse.lookup(probes), dense.lookup(probes)
    assert len(e1) > 100 and np.array_equal(p1, p2) and np.array_equal(e1, e2)
    assert np.array_equal(L.merge_runs(dense.runs, set()).all_keys(), sparse.runs[0].keys)


def test_a_streamed_synthetic_index_is_a_valid_dense_run(tmp_path, monkeypatch):
    """The benchmark's 10,000 h index is written bucket range by bucket range: it must load, verify and look up."""
    monkeypatch.setattr(L, "DENSE_ENTRIES", 1)
    monkeypatch.setattr(L, "KEY_BITS", 16)  # a small bucket table: the layout is the same
    lookup = L.synthetic_index(0.5, tmp_path, triplets_per_second=40)
    run = lookup.runs[0]
    assert run.offsets is not None and len(run) == int(run.offsets[-1]) > 50_000
    assert L.load(tmp_path, verify=True).entries == len(run)
    probe = np.array([7, 1 << 10, (1 << 16) - 1], dtype=np.uint32)
    found, _ = lookup.lookup(probe)
    assert np.array_equal(np.bincount(found, minlength=3), np.diff(run.offsets.astype(np.int64))[probe])


def test_lookup_saves_atomically_and_loads_back(tmp_path):
    source = Prints({i: syn.bursts(4, seed=i) for i in range(1, 4)})
    lookup = L.PrintLookup()
    lookup.sync(source)
    lookup.generation = 5
    L.save(lookup, tmp_path)
    back = L.load(tmp_path, verify=True)
    assert back.generation == 5 and set(back.covered()) == {1, 2, 3}
    assert np.array_equal(back.runs[0].keys, lookup.runs[0].keys)


def test_damaged_lookup_files_are_reported(tmp_path):
    lookup = L.PrintLookup()
    lookup.sync(Prints({1: syn.melody(4, seed=1)}))
    L.save(lookup, tmp_path)
    run_file = next(tmp_path.glob(L.RUN_GLOB))
    data = bytearray(run_file.read_bytes())
    data[-3] ^= 0xFF
    run_file.write_bytes(bytes(data))
    with pytest.raises(L.LookupCorrupt, match="checksum"):
        L.load(tmp_path, verify=True)
    run_file.write_bytes(bytes(data[:-7]))
    with pytest.raises(L.LookupCorrupt, match="damaged"):
        L.load(tmp_path)
    (tmp_path / L.MANIFEST).write_text("{not json")
    with pytest.raises(L.LookupCorrupt):
        L.load(tmp_path)


def test_a_save_killed_before_its_manifest_leaves_the_old_state(tmp_path, monkeypatch):
    lookup = L.PrintLookup()
    lookup.sync(Prints({1: syn.melody(4, seed=1)}))
    L.save(lookup, tmp_path)
    lookup.sync(Prints({1: syn.melody(4, seed=1), 2: syn.melody(4, seed=2)}))
    real = L._write_atomic

    def crash_on_manifest(path, parts):
        if path.name == L.MANIFEST:
            raise KeyboardInterrupt  # killed between the new run and the manifest
        real(path, parts)

    monkeypatch.setattr(L, "_write_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        L.save(lookup, tmp_path)
    monkeypatch.setattr(L, "_write_atomic", real)
    assert set(L.load(tmp_path, verify=True).covered()) == {1}  # the old manifest still holds
    assert len(list(tmp_path.glob(L.RUN_GLOB))) == 2  # the new run is an orphan ...
    L.save(L.load(tmp_path), tmp_path)
    assert len(list(tmp_path.glob(L.RUN_GLOB))) == 1  # ... which the next save removes


# -- end to end through the CLI --------------------------------------------------------------


@needs_sox
def test_a_sped_up_excerpt_is_a_duplicate_with_its_offset_and_factors(match_index, match_library, tiny_model, tmp_path):
    cut = excerpt(match_library / "melody_a.wav", 7.0, 8.0, tmp_path / "cut.wav")
    clip = sox(cut, tmp_path / "fast.wav", "speed", "1.05")
    hits = query(match_index, tiny_model, clip)
    top = hits[0]
    assert top["path"] == str(match_library / "melody_a.wav") and top["match"]["kind"] == "duplicate"
    m = top["match"]
    assert abs(m["speed"] - 1.05) < 0.0105 and abs(m["pitch"] - 1.05) < 0.0105
    assert abs(m["start"] - (7.0 + m["query_start"] * m["speed"])) < 0.1
    assert m["score"] >= 0.5
    assert [h for h in hits[1:] if h["match"]["kind"] == "duplicate"] == []


@needs_sox
def test_a_pitch_shifted_excerpt_is_a_duplicate(match_index, match_library, tiny_model, tmp_path):
    cut = excerpt(match_library / "melody_b.flac", 4.0, 9.0, tmp_path / "cut.wav")
    clip = sox(cut, tmp_path / "up.wav", "pitch", "200")
    m = query(match_index, tiny_model, clip)[0]["match"]
    assert m["kind"] == "duplicate"
    assert abs(m["pitch"] - 2 ** (2 / 12)) < 0.0112 and abs(m["speed"] - 1) < 0.01
    assert abs(m["start"] - (4.0 + m["query_start"])) < 0.1


def test_a_noisy_excerpt_is_a_duplicate(match_index, match_library, tiny_model, tmp_path):
    data, _ = sf.read(match_library / "bursts_a.wav", dtype="float32")
    part = data[5 * RATE: 13 * RATE]
    noise = np.random.default_rng(0).standard_normal(len(part)).astype(np.float32)
    noise *= np.sqrt(np.mean(part**2) / np.mean(noise**2) / 100)  # 20 dB SNR
    clip = write(tmp_path / "noisy.wav", part + noise, RATE)
    top = query(match_index, tiny_model, clip, "--no-filter")[0]
    assert top["path"] == str(match_library / "bursts_a.wav") and top["match"]["kind"] == "duplicate"
    assert abs(top["match"]["start"] - (5.0 + top["match"]["query_start"])) < 0.1


def test_a_similar_but_different_sound_is_not_a_duplicate(match_index, tiny_model, tmp_path):
    for seed, make in ((11, syn.melody), (12, syn.bursts)):
        clip = write(tmp_path / f"other{seed}.wav", make(10, seed=seed), RATE)
        hits = query(match_index, tiny_model, clip, "--no-filter")
        assert hits and all(h["match"] == {"kind": "similar"} for h in hits)


def test_the_label_filter_never_hides_a_duplicate(match_index, match_library, tiny_model, tmp_path):
    clip = excerpt(match_library / "bursts_b.wav", 2.0, 6.0, tmp_path / "cut.wav")
    hits = query(match_index, tiny_model, clip, "--label", "Speech")
    assert hits[0]["path"] == str(match_library / "bursts_b.wav") and hits[0]["match"]["kind"] == "duplicate"
    only = query(match_index, tiny_model, clip, "--duplicates-only")
    assert [h["path"] for h in only] == [str(match_library / "bursts_b.wav")]
    similar = query(match_index, tiny_model, clip, "--similar-only", "--no-filter")
    assert all(h["match"] == {"kind": "similar"} for h in similar)
    assert query(match_index, tiny_model, clip, "--duplicates-only", "--min-match", "30") == []


@pytest.mark.parametrize("name", ["click.wav", "tick.wav"])
def test_very_short_library_sounds_are_found(match_index, match_library, tiny_model, tmp_path, name):
    """0.3 s and 0.12 s sounds, quieter and with noise 30 dB down."""
    data, _ = sf.read(match_library / name, dtype="float32")
    noise = np.random.default_rng(1).standard_normal(len(data)).astype(np.float32)
    noise *= np.sqrt(np.mean(data**2) / np.mean(noise**2) / 1000)
    clip = write(tmp_path / name, 0.5 * (data + noise), RATE)
    top = query(match_index, tiny_model, clip, "--no-filter")[0]
    assert top["path"] == str(match_library / name) and top["match"]["kind"] == "duplicate"


def test_table_says_duplicate_or_similar(match_index, match_library, tiny_model, tmp_path):
    clip = excerpt(match_library / "melody_a.wav", 3.0, 6.0, tmp_path / "cut.wav")
    out = run("query", clip, "--index", match_index, "--model", tiny_model, "--no-filter", "-k", "3")
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]  # piped: tab-separated
    assert rows[0][3:6] == ["match", "start", "end"]
    assert rows[1][3] == "duplicate" and abs(float(rows[1][4]) - 3.0) < 0.2
    assert any(r[3] == "similar" for r in rows[2:])


def test_python_api_matches_a_waveform_in_memory(match_index, match_library):
    data, rate = sf.read(match_library / "melody_a.wav", dtype="float32")
    with Matcher.open(match_index) as matcher:
        found = matcher.match_waveform(data[10 * rate: 16 * rate], rate)
    assert found[0].path == str(match_library / "melody_a.wav")
    assert abs(found[0].start - (10 + found[0].query_start)) < 0.1 and abs(found[0].speed - 1) < 0.01


def test_deleted_file_stops_matching_and_lookup_is_rebuilt(match_library, tiny_model, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(match_library, lib)
    index = tmp_path / "idx"
    run("ingest", lib, "--index", index, "--model", tiny_model)
    clip = excerpt(lib / "bursts_a.wav", 3.0, 6.0, tmp_path / "cut.wav")
    kept = tmp_path / "bursts_a_copy.wav"
    shutil.copy(lib / "bursts_a.wav", kept)
    for path in [index / L.MANIFEST, *index.glob(L.RUN_GLOB)]:
        path.unlink()  # the lookup is derived: a query rebuilds it from SQLite
    assert query(index, tiny_model, clip, "--duplicates-only")[0]["path"] == str(lib / "bursts_a.wav")
    assert (index / L.MANIFEST).exists()
    run("doctor", "--index", index)
    (lib / "bursts_a.wav").unlink()
    run("ingest", lib, "--index", index, "--model", tiny_model)
    assert query(index, tiny_model, clip, "--duplicates-only") == []
    run("doctor", "--index", index)


def test_doctor_repairs_a_damaged_lookup(match_library, tiny_model, tmp_path):
    index = tmp_path / "idx"
    run("ingest", match_library, "--index", index, "--model", tiny_model)
    run_file = next(index.glob(L.RUN_GLOB))
    run_file.write_bytes(run_file.read_bytes()[:100])
    out = run("doctor", "--index", index, code=1)
    assert "print lookup is damaged" in out
    assert "rebuilt the print lookup" in run("doctor", "--index", index, "--repair")
    run("doctor", "--index", index)


def test_a_lookup_of_older_keys_is_rebuilt_not_trusted(match_library, tiny_model, tmp_path):
    """An index saved by an earlier release holds keys this one does not make: queries and doctor must notice."""
    index = tmp_path / "idx"
    run("ingest", match_library, "--index", index, "--model", tiny_model)
    manifest = index / L.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "keys": 1}))
    assert "print lookup is outdated" in run("doctor", "--index", index, code=1)
    clip = tmp_path / "clip.wav"
    write(clip, syn.melody(30, seed=1, rate=44100)[44100 * 5: 44100 * 15], 44100)
    hits = query(index, tiny_model, clip)
    assert hits[0]["path"].endswith("melody_a.wav") and hits[0]["match"]["kind"] == "duplicate"
    run("doctor", "--index", index)  # the query saved the rebuilt lookup


def test_a_fingerprint_taken_as_the_signal_arrives_is_the_whole_signals():
    """Decoders fingerprint a file as they decode it, block by block: the peaks must be the very
    peaks of the whole signal, whatever the blocks (the floor depends on the loudest point of all)."""
    rng = np.random.default_rng(5)
    long = np.concatenate([syn.melody(40, seed=1), 0.01 * syn.noise(30, seed=2), 3 * syn.bursts(25, seed=3)])
    for x in (long, long[:RATE * 2], long[:RATE * 2 - 1], long[: int(RATE * 33.3)], np.zeros(0, np.float32)):
        whole = fingerprint(x)
        for _ in range(3):
            stream, i = F.PrintStream(), 0
            while i < len(x):
                k = int(rng.choice([1, 333, 22_050, int(rng.integers(1, 200_000))]))
                stream.feed(x[i:i + k])
                i += k
            got = stream.finish()
            assert (got.duration, got.short) == (whole.duration, whole.short)
            for field in ("times", "bands", "strengths"):
                np.testing.assert_array_equal(getattr(got, field), getattr(whole, field))
    assert len(fingerprint(long)) > 500 and fingerprint(long).times[-1] > 90  # the test is not vacuous
