"""What `--durable` (SQLite synchronous=FULL) costs next to the default (NORMAL), side by side.

    python -m benchmarks.durable [--commits 300] [--files 24] [--rounds 3] [--json]

commit   one transaction per file (a file row, 2 segments of 768-dim vectors with
         527 scores): wall ms per commit. FULL syncs the WAL at every commit,
         NORMAL only at checkpoints. Ingest commits at most once a second
         (COMMIT_SECONDS), so this is the worst case.
ingest   `ingest` of a generated library (`--files` files, 2..22 s) with a
         tiny AST (2 layers: the model costs little, so commits weigh the most
         they can), into a fresh index: wall seconds.
Rounds alternate NORMAL and FULL so that other load on the machine slows both alike.
The index lives in a temporary folder (the disk that holds /tmp).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def commit_ms(folder: Path, commits: int, durable: bool) -> float:
    from audiosearch.store import SegmentResult, Store

    store = Store(folder, create=True, durable=durable)
    store.ensure_labels({i: f"label {i}" for i in range(527)})
    rng = np.random.default_rng(0)
    segments = [SegmentResult(0.0, 10.24, rng.standard_normal(768).astype(np.float32), rng.random(527)),
                SegmentResult(10.24, 20.48, rng.standard_normal(768).astype(np.float32), rng.random(527))]
    started = time.perf_counter()
    for i in range(commits):
        with store.transaction():
            store.write_file({"path": f"/audio/{i}.wav", "size": 1, "mtime": 0.0, "status": "ok"}, segments)
    seconds = time.perf_counter() - started
    store.close()
    return 1000 * seconds / commits


def ingest_seconds(library: Path, model: Path, index: Path, durable: bool) -> float:
    from audiosearch.ingest import ingest

    started = time.perf_counter()
    ingest([library], index_dir=index, model=str(model), device="cpu", precision="fp32", durable=durable)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import soundfile as sf

    from audiosearch import synthetic as syn

    work = Path(tempfile.mkdtemp(prefix="audiosearch-durable-"))
    try:
        library, model = work / "library", work / "model"
        library.mkdir()
        for i in range(args.files):
            sf.write(library / f"{i:02d}.wav", syn.noise((2.0, 6.0, 22.0)[i % 3], seed=i), 16000)
        syn.save_random_checkpoint(model, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128)
        results: dict[str, dict[str, list[float]]] = {"commit_ms": {}, "ingest_s": {}}
        for r in range(args.rounds):
            for durable in (False, True) if r % 2 == 0 else (True, False):
                mode = "FULL" if durable else "NORMAL"
                results["commit_ms"].setdefault(mode, []).append(
                    commit_ms(work / f"commit-{r}-{mode}", args.commits, durable))
                results["ingest_s"].setdefault(mode, []).append(
                    ingest_seconds(library, model, work / f"ingest-{r}-{mode}", durable))
        summary = {
            what: {mode: round(statistics.median(v), 3) for mode, v in by_mode.items()}
            for what, by_mode in results.items()
        }
        for what in summary.values():
            what["ratio"] = round(what["FULL"] / what["NORMAL"], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'':10} {'NORMAL':>10} {'FULL':>10} {'FULL/NORMAL':>12}   (median of {args.rounds} rounds)")
    for what, row in summary.items():
        print(f"{what:10} {row['NORMAL']:>10} {row['FULL']:>10} {row['ratio']:>12}")


if __name__ == "__main__":
    main()
