"""Label-filtered k-NN over a VectorIndex, planned so that results match exact filtered search.

Strategies (all search the IVF index in place; none copies vectors out of it):

- ``ivf``: no filter; the ``nprobe`` inverted lists nearest the query.
- ``exact``: every matching vector. Only the lists holding a match are scanned,
  with an ``IDSelectorBitmap``, so distances are computed for matches only.
  Reconstructing the matches by id (hashtable lookups, ~3 us a vector) and
  brute-forcing them was slower at n=100k: 3.4 vs 1.3 ms for 1000 matches,
  30 vs 17 ms for 10000.
- ``ivf-filter``: the same bitmap, probing only the lists that hold a match,
  nearest first; nprobe grows as the filter gets more selective
  (_filter_nprobe). Becomes ``exact`` when that covers every list with a match,
  which is how rare labels end up exact.
- ``postfilter``: for labels on most segments, an unfiltered search for
  ``k * margin / selectivity`` candidates, kept if ``filter.contains`` them.
  It never calls ``filter.ids()``, which costs most for common labels.
- ``empty``: nothing matches.

Queries an approximate strategy leaves short of min(k, matches) results are
re-run: postfilter -> ivf-filter -> exact. Every call builds its own selectors
and search parameters, so concurrent readers can share one index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import faiss
import numpy as np

from .index import VectorIndex, dense

STRATEGIES = ("auto", "exact", "ivf", "ivf-filter", "postfilter")
Result = tuple[np.ndarray, np.ndarray]  # scores [q, k] float32, ids [q, k] int64

# Calibrated with `python -m benchmarks.search` (see BENCHMARKS.md;
# qps are one query per call on a shared 2-core Xeon, recall is recall@10).
#
# ivf-filter probes default_nprobe * (1 + SLOPE * (1/s - 1)) lists at selectivity s:
# the default at s=1, 3/s - 2 times it below. Recall at n=100k (nlist 1265,
# default 24) probing m * default / s lists:
#   independent s=0.1: m=1 -> 0.994, m=2 -> 0.999;  s=0.5: m=1 -> 0.989, m=2 -> 0.998
#   correlated  s=0.5: m=1 -> 0.987, m=2 -> 1.000
# and at n=1M (nlist 4000, default 32) m=1 already gave >= 0.998. SLOPE 3
# probes >= 2 * default / s for s <= 0.5 (4x the default at s=0.5, 28x at 0.1).
FILTER_NPROBE_SLOPE = 3.0
# postfilter vs ivf-filter, qps at recall >= 0.99 (correlated / independent labels):
#   s=1:   100k 787 vs 519 / 786 vs 514;  1M 238 vs 85 / 148 vs 47
#   s=0.5: 100k 233 vs 252 / 270 vs 339;  1M  37 vs 65 /  58 vs 49
# (correlated: half the queries find too few matches and fall back). The
# switch sits between; postfilter also spares the app a big `filter.ids()`.
POSTFILTER_MIN_SELECTIVITY = 0.75
# Candidates per expected match: margins 1.5, 2 and 3 gave the same recall at
# 100k (s=0.5 and 1); 1.5 left 3-4% of the queries short at s=0.5, 2 none.
POSTFILTER_MARGIN = 2.0


class Filter(Protocol):
    """A set of segment ids (e.g. the segments carrying a label)."""

    def count(self) -> int: ...

    def ids(self) -> np.ndarray: ...

    def contains(self, ids: np.ndarray) -> np.ndarray: ...


@dataclass
class Plan:
    """How a search ran, for `--explain`."""

    strategy: str
    matching: int | None = None
    nprobe: int | None = None
    distances: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)  # strategy -> queries re-run with it
    reason: str = ""

    def explain(self) -> list[str]:
        lines = [f"strategy: {self.strategy}" + (f" ({self.reason})" if self.reason else "")]
        if self.matching is not None:
            lines.append(f"matching segments: {self.matching}")
        if self.nprobe is not None:
            lines.append(f"inverted lists probed per query: {self.nprobe}")
        lines.append(f"distance computations: {self.distances}")
        for strategy, count in self.fallbacks.items():
            lines.append(f"queries re-run with {strategy} because they found too few results: {count}")
        lines += [f"{stage}: {seconds * 1e3:.2f} ms" for stage, seconds in self.timings.items()]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.explain())


@dataclass(frozen=True)
class _Matches:
    """A filter resolved against the index."""

    count: int  # matching ids the index holds
    per_list: np.ndarray  # matches in each inverted list
    ids: faiss.IDSelector
    lists: faiss.IDSelector  # the lists holding a match

    @property
    def nonempty(self) -> int:
        return int(np.count_nonzero(self.per_list))


def search(
    index: VectorIndex,
    queries: np.ndarray,
    k: int,
    *,
    filter: Filter | None = None,
    strategy: str = "auto",
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray, Plan]:
    """Top-k inner products per query: (scores [q, k] float32, ids [q, k] int64, plan).

    Best first; rows are padded with id -1 and score -inf when fewer than k
    segments (match and) exist. `nprobe` overrides the planner's choice.
    """
    queries = _check_args(index, queries, k, filter, strategy, nprobe)
    plan = Plan(strategy=strategy)
    if filter is None:
        scores, ids = _unfiltered(index, queries, k, nprobe, plan)
    else:
        scores, ids = _filtered(index, queries, k, filter, nprobe, plan)
    scores[ids < 0] = -np.inf
    return scores, ids, plan


def _check_args(
    index: VectorIndex, queries: np.ndarray, k: int, filter: Filter | None, strategy: str, nprobe: int | None
) -> np.ndarray:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if filter is None and strategy in ("ivf-filter", "postfilter"):
        raise ValueError(f"strategy {strategy!r} needs a filter")
    if filter is not None and strategy == "ivf":
        raise ValueError("strategy 'ivf' ignores filters; use 'ivf-filter'")
    if k < 1 or (nprobe is not None and nprobe < 1):
        raise ValueError("k and nprobe must be at least 1")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.dim:
        raise ValueError(f"queries must have shape (n, {index.dim}), not {queries.shape}")
    return queries


def _unfiltered(index: VectorIndex, queries: np.ndarray, k: int, nprobe: int | None, plan: Plan) -> Result:
    p = index.nlist if plan.strategy == "exact" else min(index.nlist, nprobe or index.default_nprobe)
    plan.strategy = "exact" if p >= index.nlist else "ivf"
    plan.nprobe, plan.reason = p, f"no filter: {p} of {index.nlist} lists"
    weights = index.layout().sizes
    scores, ids = _probe(index, queries, k, p, plan, weights)
    short = _short(ids, min(k, index.ntotal))
    if short.any():
        plan.fallbacks["exact"] = int(short.sum())
        scores[short], ids[short] = _probe(index, queries[short], k, index.nlist, plan, weights)
    return scores, ids


def _filtered(
    index: VectorIndex, queries: np.ndarray, k: int, filter: Filter, nprobe: int | None, plan: Plan
) -> Result:
    """postfilter -> ivf-filter -> exact: each re-runs the queries the one before left short."""
    with _timed(plan, "filter count"):
        m = plan.matching = int(filter.count())
    if m == 0:
        plan.strategy, plan.reason = "empty", "no segment matches the filter"
        return _empty(len(queries), k)
    selectivity = min(1.0, m / max(index.ntotal, 1))
    if plan.strategy == "auto":
        plan.strategy = "postfilter" if selectivity >= POSTFILTER_MIN_SELECTIVITY else "ivf-filter"
    if plan.strategy == "postfilter":
        scores, ids = _postfilter(index, queries, k, filter, selectivity, nprobe, plan)
        short = _short(ids, min(k, m))
        if not short.any():
            return scores, ids
        matches = _resolve(index, filter, plan)
        plan.fallbacks["ivf-filter"] = int(short.sum())
        p = _filter_nprobe(index, selectivity)
        scores[short], ids[short] = _within_matches(index, queries[short], k, matches, p, plan)
    else:
        matches = _resolve(index, filter, plan)
        scores, ids = _selective(index, queries, k, matches, selectivity, nprobe, plan)
    short = _short(ids, min(k, matches.count))
    if short.any():
        plan.fallbacks["exact"] = int(short.sum())
        scores[short], ids[short] = _within_matches(index, queries[short], k, matches, matches.nonempty, plan)
    return scores, ids


def _filter_nprobe(index: VectorIndex, selectivity: float) -> int:
    """Lists to probe under a filter: the default at selectivity 1, growing like 3 / selectivity."""
    return math.ceil(index.default_nprobe * (1 + FILTER_NPROBE_SLOPE * (1 / selectivity - 1)))


def _selective(
    index: VectorIndex, queries: np.ndarray, k: int, matches: _Matches, selectivity: float, nprobe: int | None,
    plan: Plan,
) -> Result:
    """ivf-filter, or exact when that would probe every list holding a match anyway."""
    p = matches.nonempty if plan.strategy == "exact" else nprobe or _filter_nprobe(index, selectivity)
    if p >= matches.nonempty:
        plan.strategy, plan.nprobe = "exact", matches.nonempty
        plan.reason = f"scan all {matches.nonempty} lists holding the {matches.count} matches"
    else:
        plan.strategy, plan.nprobe = "ivf-filter", p
        plan.reason = f"{p} of the {matches.nonempty} lists holding matches (selectivity {selectivity:.2%})"
    return _within_matches(index, queries, k, matches, p, plan)


def _within_matches(
    index: VectorIndex, queries: np.ndarray, k: int, matches: _Matches, nprobe: int, plan: Plan
) -> Result:
    """The nprobe nearest lists that hold a match, computing distances for matches only."""
    if matches.nonempty == 0:
        return _empty(len(queries), k)
    p = min(nprobe, matches.nonempty)
    return _probe(index, queries, k, p, plan, matches.per_list, sel=matches.ids, lists=matches.lists)


def _postfilter(
    index: VectorIndex, queries: np.ndarray, k: int, filter: Filter, selectivity: float, nprobe: int | None,
    plan: Plan,
) -> Result:
    """Unfiltered candidates, enough that ~margin * k of them match, then filter.contains."""
    candidates = max(k, min(index.ntotal, math.ceil(k * POSTFILTER_MARGIN / selectivity)))
    p = min(index.nlist, nprobe or _filter_nprobe(index, selectivity))
    plan.nprobe = p
    plan.reason = f"{candidates} unfiltered candidates from {p} lists, kept if they match"
    scores, ids = _probe(index, queries, candidates, p, plan, index.layout().sizes)
    with _timed(plan, "filter contains"):
        keep = np.zeros(ids.shape, dtype=bool)
        found = ids >= 0
        keep[found] = np.asarray(filter.contains(ids[found]), dtype=bool)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept candidates first, still best first
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    ids[~np.take_along_axis(keep, order, 1)] = -1
    return scores, ids


def _short(ids: np.ndarray, want: int) -> np.ndarray:
    """Rows with fewer than `want` results."""
    return (ids >= 0).sum(axis=1) < want


def _probe(
    index: VectorIndex, queries: np.ndarray, k: int, nprobe: int, plan: Plan, weights: np.ndarray,
    sel: faiss.IDSelector | None = None, lists: faiss.IDSelector | None = None,
) -> Result:
    """IVF search of the nprobe nearest lists (among `lists`), keeping ids in `sel`.

    The coarse step is done here rather than inside FAISS so that lists without a
    match are never probed and the plan can count the distances computed.
    """
    n, ivf = len(queries), index.ivf
    with _timed(plan, "coarse"):
        coarse = faiss.SearchParameters(sel=lists) if lists is not None else None
        centroid_scores, probed = ivf.quantizer.search(queries, nprobe, params=coarse)
    with _timed(plan, "scan"):
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
        ivf.search_preassigned_c(
            n, faiss.swig_ptr(queries), k, faiss.swig_ptr(probed), faiss.swig_ptr(centroid_scores),
            faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params,
        )
    coarse_distances = n * (int(np.count_nonzero(weights)) if lists is not None else index.nlist)
    plan.distances += coarse_distances + int(weights[probed[probed >= 0]].sum())
    return scores, ids


def _resolve(index: VectorIndex, filter: Filter, plan: Plan) -> _Matches:
    with _timed(plan, "filter ids"):
        ids = np.asarray(filter.ids(), dtype=np.int64)
        if len(ids) and ids.min() < 0:
            ids = ids[ids >= 0]
    with _timed(plan, "layout"):
        layout = index.layout()
    with _timed(plan, "selectors"):
        per_list = np.bincount(layout.lists(ids) + 1, minlength=index.nlist + 1)[1:]  # +1: -1 means not held
        return _Matches(int(per_list.sum()), per_list, _selector(ids), _selector(np.flatnonzero(per_list)))


def _selector(ids: np.ndarray) -> faiss.IDSelector:
    """An IDSelectorBitmap, built in O(max id) with numpy, with O(1) lookups.

    Ids too sparse for a bitmap (not SQLite rowids) get an IDSelectorBatch, a
    hash set that is slower to build.
    """
    top = int(ids.max()) if len(ids) else 0
    if not dense(top, len(ids)):
        return faiss.IDSelectorBatch(ids)
    mask = np.zeros(top + 1, dtype=bool)
    mask[ids] = True
    return faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))


def _empty(n: int, k: int) -> Result:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


@contextmanager
def _timed(plan: Plan, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        plan.timings[stage] = plan.timings.get(stage, 0.0) + time.perf_counter() - start
