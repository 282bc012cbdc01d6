"""Duplicate-report benchmark: a synthetic library with planted duplicates under known edits.

    python -m benchmarks.dupes [--hours 10] [--planted 0.1] [--new 0.01] [--work DIR] [--jobs 2]
                               [--workers N] [--library DIR] [--no-check]

Files (20-52 s, 36 s on average: the issue's 100,000 files / 1,000 h) are generated
(plucked melodies and effect-like bursts), fingerprinted straight from the samples and
written to a fresh index's SQLite: the fingerprint path alone, without the AST model
(embeddings play no part in `dupes` without --similar). A share of the files are
planted copies of others under one edit each: a light re-encode (noise at 40 dB SNR),
gain, speed (resampling: faster and higher), tempo and pitch (sox), an excerpt
(contained), a trimmed copy, and a partial overlap. Then:

1. full run: every file matched against the lookup index;
2. +1 % new files (new originals, and copies of old files both ways round: excerpts of
   old files and new files holding an old one), then the incremental run;
3. a full run on the grown library, to check that the incremental report equals it.

Prints precision and recall of the planted pairs per edit and the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RATE = 16000
EDITS = ["reencode", "gain", "speed", "tempo", "pitch", "excerpt", "trimmed", "partial"]
EXPECTED_KIND = {"reencode": "whole", "gain": "whole", "speed": "whole", "tempo": "whole", "pitch": "whole",
                 "excerpt": "contained", "trimmed": "contained", "holder": "contained", "partial": "partial"}


def _original(seed: int) -> np.ndarray:
    from audiosearch import synthetic as syn

    rng = np.random.default_rng(seed)
    seconds = float(rng.uniform(20, 52))
    return syn.melody(seconds, seed=seed) if seed % 2 else syn.bursts(seconds, seed=seed)


def _sox(x: np.ndarray, *effect: str) -> np.ndarray:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.wav"), os.path.join(tmp, "out.wav")
        sf.write(src, x, RATE, subtype="FLOAT")
        subprocess.run(["sox", src, dst, *effect], check=True, capture_output=True)
        return sf.read(dst, dtype="float32")[0]


def _edited(x: np.ndarray, edit: str, rng: np.random.Generator) -> np.ndarray:
    import soxr

    from audiosearch import synthetic as syn

    n = len(x)
    if edit == "reencode":
        return (x + rng.normal(0, np.sqrt(np.mean(x**2)) * 0.01, n)).astype(np.float32)
    if edit == "gain":
        return (x * rng.choice([0.25, 0.5, 1.8])).astype(np.float32)
    if edit == "speed":  # resampled and played at the old rate: faster and higher together
        return soxr.resample(x, RATE, RATE / rng.choice([0.95, 1.05])).astype(np.float32)
    if edit == "tempo":
        return _sox(x, "tempo", str(rng.choice([0.93, 1.07])))
    if edit == "pitch":
        return _sox(x, "pitch", str(rng.choice([-200, 200])))
    if edit == "excerpt":  # 8-15 s from inside
        length = int(rng.uniform(8, 15) * RATE)
        start = int(rng.uniform(0, n - length))
        return x[start:start + length].copy()
    if edit == "trimmed":  # 2-4 s off each end
        return x[int(rng.uniform(2, 4) * RATE): n - int(rng.uniform(2, 4) * RATE)].copy()
    if edit == "partial":  # the last 10 s followed by new audio
        return np.concatenate([x[n - 10 * RATE:], syn.bursts(15, seed=int(rng.integers(1 << 30)))]).astype(np.float32)
    if edit == "holder":  # new audio around the whole file
        return np.concatenate([syn.bursts(6, seed=int(rng.integers(1 << 30))), x,
                               syn.bursts(5, seed=int(rng.integers(1 << 30)))]).astype(np.float32)
    raise ValueError(edit)


def _make(task: tuple) -> tuple[int, float, bytes]:
    """(file number, duration, fingerprint bytes) of one library file."""
    from audiosearch.match.fingerprint import fingerprint

    number, seed, source_seed, edit = task
    if edit is None:
        x = _original(seed)
    else:
        x = _edited(_original(source_seed), edit, np.random.default_rng(seed))
    return number, len(x) / RATE, fingerprint(x, RATE).to_bytes()


def _write(index: Path, tasks: list[tuple], jobs: int) -> float:
    """Generate and fingerprint the files of `tasks` into the index's SQLite; seconds of audio."""
    from audiosearch.match.fingerprint import HEADER_BYTES, PEAK_BYTES, VERSION
    from audiosearch.store import PrintRow, Store

    store = Store(index, create=True)
    audio = 0.0
    try:
        with ProcessPoolExecutor(jobs) as pool:
            done = list(pool.map(_make, tasks, chunksize=16))
        with store.transaction():
            for number, seconds, data in done:
                row = {"path": f"/synthetic/{number:06d}.wav", "size": 0, "mtime": 0.0, "hash": str(number),
                       "duration": seconds, "sample_rate": RATE, "channels": 1, "format": "WAV", "subtype": "PCM_16",
                       "status": "ok"}
                store.write_file(row, [], PrintRow(VERSION, (len(data) - HEADER_BYTES) // PEAK_BYTES, data))
                audio += seconds
    finally:
        store.close()
    return audio


def _plan(first: int, count: int, planted: float, seed: int, old: list[int] | None) -> tuple[list[tuple], dict]:
    """Tasks for files first..first+count-1; copies of originals among them (or of the `old` originals).

    A copy's source is always an original: a task regenerates its source from the source's seed,
    which for a planted copy would be another sound than the library holds under that number.
    """
    rng = np.random.default_rng(seed)
    tasks, truth = [], {}
    originals: list[int] = []
    for number in range(first, first + count):
        pool = list(old) if old is not None else originals
        if pool and rng.random() < planted:
            source = int(rng.choice(pool))
            edit = str(rng.choice(EDITS + (["holder"] if old is not None else [])))
            tasks.append((number, 1_000_000 + number, source, edit))
            truth[frozenset((source, number))] = edit
        else:
            tasks.append((number, number, None, None))
            if old is None:
                originals.append(number)
    return tasks, truth


def originals(tasks: list[tuple]) -> list[int]:
    """The file numbers of the tasks' originals (not planted copies)."""
    return [number for number, _, _, edit in tasks if edit is None]


def _run(index: Path, full: bool, workers: int = 1) -> tuple[dict, float, object]:
    from audiosearch.collection import Collection
    from audiosearch.match.dupes import update_pairs

    collection = Collection(index)
    try:
        with collection.writing():
            collection.refresh_prints()
        started, cpu = time.perf_counter(), time.process_time()
        pairs, stats = update_pairs(collection, full=full, workers=workers)
        wall = time.perf_counter() - started
        stats.cpu = time.process_time() - cpu  # this process only: with --workers 1, all the matching
        paths = collection.store.print_file_details({i for p in pairs for i in (p.fp_a, p.fp_b)})
        number = {fp: int(Path(d["path"]).stem) for fp, d in paths.items()}
        found = {frozenset((number[p.fp_a], number[p.fp_b])): p for p in pairs}
        return found, wall, stats
    finally:
        collection.close()


def _score(found: dict, truth: dict) -> list[tuple[str, int, int, int]]:
    """Per edit: (edit, planted, found, of which the expected kind); then 'false' pairs."""
    rows = []
    for edit in [*EDITS, "holder"]:
        planted = [k for k, e in truth.items() if e == edit]
        if not planted:
            continue
        hit = [k for k in planted if k in found]
        rows.append((edit, len(planted), len(hit), sum(found[k].kind == EXPECTED_KIND[edit] for k in hit)))
    return rows


def _families(truth: dict) -> dict[int, int]:
    """File number -> the original its planted copies descend from (copies of one file share audio too)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for pair in truth:
        a, b = sorted(pair)
        parent[root(b)] = root(a)
    return {i: root(i) for i in parent}


def _report(name: str, found: dict, truth: dict, wall: float, stats, audio: float) -> dict:
    rows = _score(found, truth)
    family = _families(truth)
    tp = sum(1 for k in found if k in truth)
    implied = sum(1 for k in found if k not in truth and len({family.get(i, -1 - i) for i in k}) == 1)
    false = len(found) - tp - implied
    precision = (tp + implied) / max(1, len(found))
    recall = tp / max(1, len(truth))
    print(f"\n{name}: {stats.fingerprints} files, {audio / 3600:.1f} h; matched {stats.matched} as queries "
          f"in {wall:.1f} s wall, {stats.cpu:.1f} s CPU ({stats.matched / max(stats.cpu, 1e-9):.1f} files per CPU second)")
    print(f"  pairs found {len(found)} ({tp} planted, {implied} between copies of one original, {false} false); "
          f"planted {len(truth)}: precision {precision:.3f}, recall {recall:.3f}")
    print(f"  {'edit':10} {'planted':>8} {'found':>6} {'recall':>7} {'kind ok':>8}")
    for edit, n, hit, kind_ok in rows:
        print(f"  {edit:10} {n:8d} {hit:6d} {hit / n:7.3f} {kind_ok:8d}")
    return {"files": stats.fingerprints, "hours": audio / 3600, "matched": stats.matched, "wall_s": wall,
            "cpu_s": stats.cpu,
            "pairs": len(found), "implied": implied, "false": false, "planted": len(truth), "precision": precision, "recall": recall,
            "per_edit": [dict(zip(["edit", "planted", "found", "kind_ok"], r)) for r in rows]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dupes", description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=10.0, help="library size before the new files")
    ap.add_argument("--planted", type=float, default=0.1, help="share of files that are edited copies")
    ap.add_argument("--new", type=float, default=0.01, help="files added before the incremental run (share)")
    ap.add_argument("--jobs", type=int, default=2, help="processes generating audio")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="matching processes (1: CPU time is all in this one)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--library", type=Path,
                    help="keep the generated library here, and reuse it when it was made with the same options")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the last full run (at 1,000 h it costs as much as the first)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if shutil.which("sox") is None:
        raise SystemExit("sox is needed for the tempo and pitch edits (make setup installs it)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dupes-"))
    index = work / "index"
    if index.exists():
        shutil.rmtree(index)
    n = max(10, int(round(args.hours * 3600 / 36)))
    print(f"machine: {os.cpu_count()} CPUs; library {n} files (~{args.hours:g} h), planted {args.planted:.0%}, "
          f"+{args.new:.0%} new")
    tasks, truth = _plan(0, n, args.planted, args.seed, None)
    audio = _library(index, tasks, args)
    found, wall, stats = _run(index, True, args.workers)
    results = {"full": _report("full run", found, truth, wall, stats, audio)}

    extra = max(2, int(round(n * args.new)))
    new_tasks, new_truth = _plan(n, extra, 0.5, args.seed + 1, originals(tasks))
    audio += _write(index, new_tasks, args.jobs)
    truth.update(new_truth)
    found_inc, wall_inc, stats_inc = _run(index, False, args.workers)
    results["incremental"] = _report(f"incremental run (+{extra} files)", found_inc, truth, wall_inc, stats_inc, audio)
    if args.no_check:
        _finish(args, work, results)
        return
    found_full, wall_full, stats_full = _run(index, True, args.workers)
    results["full_after"] = _report("full run after the new files", found_full, truth, wall_full, stats_full, audio)
    same = {k: (p.kind, p.inner is not None) for k, p in found_inc.items()} == \
           {k: (p.kind, p.inner is not None) for k, p in found_full.items()}
    exact = sorted(found_inc.values(), key=lambda p: (p.fp_a, p.fp_b)) == \
        sorted(found_full.values(), key=lambda p: (p.fp_a, p.fp_b))
    print(f"\nincremental report equals the full run's: {'yes' if exact else 'NO'} (pairs and kinds: "
          f"{'same' if same else 'differ'}; {len(found_inc)} vs {len(found_full)} pairs)")
    ratio = stats_full.cpu / max(stats_inc.cpu, 1e-9)
    print(f"CPU: full {stats_full.cpu:.1f} s, incremental {stats_inc.cpu:.1f} s ({ratio:.0f}x less); "
          f"wall: full {wall_full:.1f} s, incremental {wall_inc:.1f} s")
    results["incremental_equals_full"] = exact
    _finish(args, work, results)


def _library(index: Path, tasks: list[tuple], args: argparse.Namespace) -> float:
    """Generate the library into `index` (or copy the one kept in --library); its seconds of audio."""
    plan = {"files": len(tasks), "planted": args.planted, "seed": args.seed}
    kept = args.library / "plan.json" if args.library else None
    saved = json.loads(kept.read_text()) if kept is not None and kept.exists() else {}
    if saved.get("plan") == plan:
        shutil.copytree(args.library / "index", index)
        audio = saved["audio"]
        print(f"reused the library kept in {args.library} ({len(tasks)} files, {audio / 3600:.1f} h)")
        return audio
    t = time.perf_counter()
    audio = _write(index, tasks, args.jobs)
    print(f"generated and fingerprinted {len(tasks)} files ({audio / 3600:.1f} h) in {time.perf_counter() - t:.0f} s")
    if kept is not None:
        shutil.rmtree(args.library, ignore_errors=True)
        shutil.copytree(index, args.library / "index")
        kept.write_text(json.dumps({"plan": plan, "audio": audio}))
    return audio


def _finish(args: argparse.Namespace, work: Path, results: dict) -> None:
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
