"""Filtered k-NN benchmark: the search planner against exact filtered search.

    python -m benchmarks.search [--sizes 10000,100000,1000000] [--json]

Indexes are built by `build_index` (the app's code) from synthetic 768-d unit
vectors shaped like segment embeddings: clusters (sound classes) under a few
parent directions, files spread along their cluster's own 16-d subspace, and
segments of a file close together, plus isotropic noise everywhere. Labels are
drawn two ways: `correlated` (whole clusters, like a sound class) and
`independent` of the clusters (the hard case for IVF). Queries are perturbed
data points (cosine ~0.97 to their source), run one at a time as the app
does; qps is 1 / median latency. Recall is the overlap with the exact filtered
top-10 (big-ann-benchmarks filter track). `brute qps` (`exact_qps` in JSON)
is numpy brute force over the matching vectors already gathered in one
matrix: the best case for exact search, which the app cannot have for every
label. Every strategy is also forced, so the planner can be compared with the
fastest one that reaches recall 0.99 without short results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from audiosearch.index import IndexOptions, VectorIndex, build_index
from audiosearch.search import search

DIM = 768
K = 10
SELECTIVITIES = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0)
SUBSPACE = 16
FILE_P = 0.25  # segments per file: geometric with mean 4
SEGMENT_NOISE = 0.5
SPREAD = 2.0  # norm of a file's offset from its cluster centre, along the cluster's subspace
TARGET_RECALL = 0.99
CHUNK = 10  # queries per turn when interleaving strategies


class ArraySource:
    """VectorSource over an in-memory matrix; ids are row + 1, like SQLite rowids."""

    def __init__(self, vectors: np.ndarray):
        self.data = vectors
        self.dim = vectors.shape[1]

    def count(self) -> int:
        return len(self.data)

    def ids(self) -> np.ndarray:
        return np.arange(1, len(self.data) + 1, dtype=np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.data[np.asarray(ids, dtype=np.int64) - 1]

    def iter_vectors(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.data), batch_size):
            stop = min(start + batch_size, len(self.data))
            yield np.arange(start + 1, stop + 1, dtype=np.int64), self.data[start:stop]

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        rows = np.random.default_rng(seed).choice(len(self.data), min(n, len(self.data)), replace=False)
        return self.data[np.sort(rows)]


class MaskFilter:
    """Filter over a boolean mask indexed by id."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self._ids = np.flatnonzero(mask).astype(np.int64)

    def count(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def contains(self, ids: np.ndarray) -> np.ndarray:
        inside = (ids >= 0) & (ids < len(self.mask))
        out = np.zeros(len(ids), dtype=bool)
        out[inside] = self.mask[ids[inside]]
        return out


def _noise(rng: np.random.Generator, rows: int, dim: int = DIM) -> np.ndarray:
    """Gaussian rows of norm ~1."""
    return rng.standard_normal((rows, dim), dtype=np.float32) / np.float32(np.sqrt(dim))


def _normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_vectors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors and the cluster of each: clusters (~1000 vectors, 20..1000 of them)
    hold files (1 + geometric, mean 4 segments) whose segments lie close together."""
    clusters = int(np.clip(n // 1000, 20, 1000))
    parents = _normalize(_noise(rng, max(4, clusters // 16)))
    centers = _normalize(parents[rng.integers(len(parents), size=clusters)] + 0.8 * _noise(rng, clusters))
    file_of = np.repeat(np.arange(n), rng.geometric(FILE_P, size=n))[:n]
    files = file_of[-1] + 1
    cluster_of_file = rng.integers(clusters, size=files)
    anchors = np.empty((files, DIM), dtype=np.float32)
    for c in range(clusters):
        rows = np.flatnonzero(cluster_of_file == c)
        spread = rng.standard_normal((len(rows), SUBSPACE), dtype=np.float32) / np.float32(np.sqrt(SUBSPACE))
        anchors[rows] = centers[c] + SPREAD * (spread @ _noise(rng, SUBSPACE)) + 0.35 * _noise(rng, len(rows))
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = slice(start, min(n, start + 65536))
        x[rows] = _normalize(anchors[file_of[rows]] + SEGMENT_NOISE * _noise(rng, len(x[rows])))
    return x, cluster_of_file[file_of]


def label_mask(cluster_of: np.ndarray, selectivity: float, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Mask over ids (row + 1) with round(selectivity * n) matches, at least one."""
    n = len(cluster_of)
    m = max(1, round(selectivity * n))
    if mode == "independent":
        rows = rng.choice(n, m, replace=False)
    else:
        rank = np.argsort(rng.permutation(cluster_of.max() + 1))
        rows = np.argsort(rank[cluster_of], kind="stable")[:m]
    mask = np.zeros(n + 1, dtype=bool)
    mask[rows + 1] = True
    return mask


def make_queries(x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return _normalize(x[rng.choice(len(x), count, replace=False)] + 0.25 * _noise(rng, count))


@dataclass
class Run:
    """One way of searching, timed over the queries it had time for."""

    search: Callable[[int], tuple[np.ndarray, str]]  # query number -> (ids, strategy used)
    rows: list = field(default_factory=list)
    used: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)

    @property
    def ids(self) -> np.ndarray:
        return np.array(self.rows)

    @property
    def qps(self) -> float:
        """1 / median latency: the machine is shared, and a median shrugs off bursts of load."""
        return 1 / float(np.median(self.latencies))


def planner_run(index: VectorIndex, queries: np.ndarray, filt, strategy: str) -> Run:
    def one(i: int) -> tuple[np.ndarray, str]:
        _, ids, plan = search(index, queries[i : i + 1], K, filter=filt, strategy=strategy)
        return ids[0], plan.strategy

    return Run(one)


def brute_force_run(matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> Run:
    """Exact search over the matching vectors, already gathered in one matrix."""
    k = min(K, len(ids))

    def one(i: int) -> tuple[np.ndarray, str]:
        scores = matrix @ queries[i]
        top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        return ids[top[np.argsort(-scores[top])]], "brute force"

    return Run(one)


def time_runs(runs: dict[str, Run], count: int, budget_s: float) -> None:
    """One query per call, the runs interleaved in chunks (in rotating order, each
    chunk after an untimed warm-up query) so that other processes' load and cache
    state hit them alike. The planner does every query; the others stop after
    `budget_s` seconds each."""
    names = list(runs)
    for turn, start in enumerate(range(0, count, CHUNK)):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            run = runs[name]
            if name != "planner" and sum(run.latencies) > budget_s:
                continue
            run.search(start)
            for i in range(start, min(count, start + CHUNK)):
                t = time.perf_counter()
                ids, used = run.search(i)
                run.latencies.append(time.perf_counter() - t)
                run.rows.append(ids)
                run.used[used] += 1


def recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query: |found & truth| / |truth|, truth padded with -1."""
    out = np.empty(len(found))
    for i, (f, t) in enumerate(zip(found, truth)):
        t = t[t >= 0]
        out[i] = len(np.intersect1d(f[f >= 0], t)) / len(t)
    return out


def _stats(run: Run, truth: np.ndarray, matching: int) -> dict:
    r = recall(run.ids, truth[: len(run.ids)])
    short = (run.ids >= 0).sum(axis=1) < min(K, matching)
    return {
        "recall_at_10": float(r.mean()), "recall_p5": float(np.percentile(r, 5)),
        "short_share": float(short.mean()), "qps": run.qps, "queries": len(run.ids),
    }


def bench_row(index, x, queries, mask, labels: str, selectivity: float, budget_s: float) -> dict:
    """Planner, every forced strategy and brute force for one filter (mask None: no filter)."""
    filt = MaskFilter(mask) if mask is not None else None
    ids = filt.ids() if filt else np.arange(1, len(x) + 1, dtype=np.int64)
    matrix = x if len(ids) == len(x) else x[ids - 1]
    _, rows = faiss.knn(queries, matrix, min(K, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
    truth = ids[rows]
    forced = ("ivf", "exact") if filt is None else ("exact", "ivf-filter", "postfilter")
    runs = {"planner": planner_run(index, queries, filt, "auto")}
    runs["brute force"] = brute_force_run(matrix, ids, queries)
    runs |= {s: planner_run(index, queries, filt, s) for s in forced}
    time_runs(runs, len(queries), budget_s)
    planner = runs["planner"]
    row = {
        "n": len(x), "labels": labels, "selectivity": selectivity, "matching": len(ids),
        "strategy": "+".join(s for s, _ in planner.used.most_common()),
        **_stats(planner, truth, len(ids)), "exact_qps": runs["brute force"].qps,
        "alternatives": {s: _stats(runs[s], truth, len(ids)) for s in forced},
    }
    good = {s: a["qps"] for s, a in row["alternatives"].items() if _meets_target(a)}
    row["best"] = max(good, key=good.get) if good else None
    row["planner_vs_best"] = row["qps"] / good[row["best"]] if good else None
    return row


def _meets_target(stats: dict) -> bool:
    return stats["recall_at_10"] >= TARGET_RECALL and stats["short_share"] == 0


def bench_size(n: int, args: argparse.Namespace) -> Iterator[dict]:
    rng = np.random.default_rng(args.seed)
    x, cluster_of = make_vectors(n, rng)
    start = time.perf_counter()
    index = build_index(ArraySource(x), IndexOptions(seed=args.seed))
    built = time.perf_counter() - start
    print(f"n={n}: built {index.factory} in {built:.1f} s", file=sys.stderr)
    queries = make_queries(x, args.queries, rng)
    yield {**bench_row(index, x, queries, None, "none", 1.0, args.budget), "build_s": built}
    for labels in ("correlated", "independent"):
        for s in SELECTIVITIES:
            mask = label_mask(cluster_of, s, labels, np.random.default_rng([args.seed, round(s * 1e4)]))
            yield {**bench_row(index, x, queries, mask, labels, s, args.budget), "build_s": built}


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title=f"Filtered search, k={K}, one query per call. Forced strategies: qps / recall@10")
    headers = ("n", "labels", "sel", "match", "planner", "R@10", "R@10 p5", "short", "qps", "brute qps",
               "exact", "ivf-filter", "postfilter | ivf", "best", "vs best")
    for name in headers:
        table.add_column(name, justify="left" if name in ("labels", "planner", "best") else "right")
    for r in rows:
        alt = r["alternatives"]
        cells = [_alt(alt.get(s)) for s in ("exact", "ivf-filter")] + [_alt(alt.get("postfilter", alt.get("ivf")))]
        table.add_row(
            str(r["n"]), r["labels"], f"{r['selectivity']:g}", str(r["matching"]), r["strategy"],
            f"{r['recall_at_10']:.3f}", f"{r['recall_p5']:.2f}", f"{r['short_share']:.0%}", f"{r['qps']:.0f}",
            f"{r['exact_qps']:.0f}", *cells, r["best"] or "-",
            f"{r['planner_vs_best']:.2f}" if r["planner_vs_best"] else "-",
        )
    console.print(table)


def _alt(stats: dict | None) -> str:
    return "" if stats is None else f"{stats['qps']:.0f} / {stats['recall_at_10']:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated collection sizes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per forced strategy and row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for row in bench_size(n, args):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows, Console(width=None if sys.stdout.isatty() else 200))


if __name__ == "__main__":
    main()
