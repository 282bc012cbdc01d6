"""Damaged `vectors.faiss`: every case in its own process, so that a native crash or a hang counts as one.

    python -m benchmarks.damage [--segments 3000] [--flips 500] [--ivf] [--json]

An index of `--segments` random 768-dim vectors (SQLite + FAISS, as ingest
writes them; IVF with k-means with --ivf) is damaged in every way below, one
forked child per case: truncated at every 4 KiB boundary and one byte short;
one bit flipped at `--flips` random offsets (a quarter of them in the header
and metadata, the rest over the whole file: ids, codes, list sizes, trailer).
In each case the child (1) loads the file: it must raise IndexCorrupt, nothing
else; (2) opens the index as a reader: it must serve exactly SQLite's ids and
vectors and save a sound file again. A child killed by a signal is a crash;
one that runs past 60 s is a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

CASE_TIMEOUT = 60.0


def build(index: Path, segments: int, ivf: bool) -> None:
    """SQLite rows and the FAISS file for `segments` random unit vectors (run in a child)."""
    from audiosearch.collection import Collection
    from audiosearch.index import IndexOptions
    from audiosearch.store import SegmentResult

    if ivf:
        Collection.index_options = lambda self: IndexOptions(exact_below=1000, device="cpu")
    collection = Collection(index, create=True, device="cpu")
    rng = np.random.default_rng(0)
    with collection.store.transaction():
        collection.store.set_meta({"dim": 768, "model": "random", "fingerprint": "w1:0"})
        collection.store.ensure_labels({0: "Sound"})
        for start in range(0, segments, 2):
            vectors = rng.standard_normal((2, 768)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            collection.store.write_file(
                {"path": f"/audio/{start:06d}.wav", "size": 1, "mtime": 0.0, "status": "ok"},
                [SegmentResult(i * 10.24, (i + 1) * 10.24, v, np.ones(1)) for i, v in enumerate(vectors)])
    with collection.writing():
        collection.refresh_index()
    collection.close()


def check(index: Path, data: bytes) -> None:
    """In a child: exit 0 when the damage was caught and healed, 3 when loaded, 4 on another error, 5 on wrong results."""
    from audiosearch.collection import Collection
    from audiosearch.index import IndexCorrupt, VectorIndex

    path = index / "vectors.faiss"
    path.write_bytes(data)
    try:
        VectorIndex.load(path)
        os._exit(3)
    except IndexCorrupt:
        pass
    except Exception:
        os._exit(4)
    collection = Collection(index, device="cpu")
    vectors, _ = collection.load_index()
    ids = collection.store.ids()
    served = np.array_equal(vectors.ids(), ids) and np.array_equal(vectors.reconstruct(ids),
                                                                    collection.store.vectors(ids))
    healed = VectorIndex.load(path).generation == collection.store.generation
    os._exit(0 if served and healed else 5)


def run_case(fn, *args) -> str:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
            os._exit(0)
        except BaseException:
            os._exit(6)
    deadline = time.monotonic() + CASE_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                return "crash"
            return {0: "caught", 3: "loaded", 4: "other error", 5: "wrong results", 6: "exception"}.get(code, "?")
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hang"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=3000)
    parser.add_argument("--flips", type=int, default=500)
    parser.add_argument("--ivf", action="store_true", help="an IVF index (k-means), not one list")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import audiosearch.collection  # noqa: F401  (imported once, before the forks; no FAISS op runs here)

    work = Path(tempfile.mkdtemp(prefix="audiosearch-damage-"))
    try:
        index = work / "index"
        if run_case(build, index, args.segments, args.ivf) != "caught":
            raise SystemExit("could not build the index")
        good = (index / "vectors.faiss").read_bytes()
        rng = random.Random(0)
        cases = [("truncated", good[:cut]) for cut in range(0, len(good), 4096)] + [("truncated", good[:-1])]
        for n in range(args.flips):
            at = rng.randrange(min(256, len(good))) if n % 4 == 0 else rng.randrange(len(good))
            cases.append(("flipped", good[:at] + bytes([good[at] ^ (1 << rng.randrange(8))]) + good[at + 1:]))
        outcomes: dict[str, dict[str, int]] = {}
        for kind, data in cases:
            outcome = run_case(check, index, data)
            outcomes.setdefault(kind, {}).setdefault(outcome, 0)
            outcomes[kind][outcome] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"file_bytes": len(good), "cases": len(cases), "outcomes": outcomes,
              "crashes": sum(o.get("crash", 0) for o in outcomes.values()),
              "hangs": sum(o.get("hang", 0) for o in outcomes.values()),
              "not_caught": sum(n for o in outcomes.values() for k, n in o.items() if k != "caught")}
    if args.json:
        print(json.dumps(result))
        return
    print(f"vectors.faiss of {len(good)} bytes: {len(cases)} damaged cases, {result['crashes']} crashes, "
          f"{result['hangs']} hangs, {result['not_caught']} not caught and rebuilt")
    for kind, by in outcomes.items():
        print(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(by.items())))


if __name__ == "__main__":
    main()
