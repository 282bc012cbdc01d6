"""The search planner: every strategy agrees with exact filtered search, edge cases included."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from audiosearch.index import IndexOptions, VectorIndex, build_index
from audiosearch.search import search

DIM = 32
N = 4000
K = 10


class ArraySource:
    """VectorSource over rows of a matrix; ids are row + 1, like SQLite rowids."""

    def __init__(self, x: np.ndarray):
        self.x, self.dim = x, x.shape[1]

    def count(self) -> int:
        return len(self.x)

    def ids(self) -> np.ndarray:
        return np.arange(1, len(self.x) + 1, dtype=np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.x[ids - 1]

    def iter_vectors(self, batch_size: int):
        for start in range(0, len(self.x), batch_size):
            stop = min(start + batch_size, len(self.x))
            yield np.arange(start + 1, stop + 1, dtype=np.int64), self.x[start:stop]

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        return self.x[np.random.default_rng(seed).choice(len(self.x), min(n, len(self.x)), replace=False)]


class SetFilter:
    """Filter over a set of ids, counting calls so tests can see what the planner asked for."""

    def __init__(self, ids):
        self._ids = np.array(sorted(ids), dtype=np.int64)
        self.calls = {"count": 0, "ids": 0, "contains": 0}

    def count(self) -> int:
        self.calls["count"] += 1
        return len(self._ids)

    def ids(self) -> np.ndarray:
        self.calls["ids"] += 1
        return self._ids

    def contains(self, ids: np.ndarray) -> np.ndarray:
        self.calls["contains"] += 1
        return np.isin(ids, self._ids)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, DIM))
    cluster = rng.integers(20, size=N)
    x = (centers[cluster] + 0.6 * rng.standard_normal((N, DIM))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(N, 8, replace=False)] + 0.1 * rng.standard_normal((8, DIM)).astype(np.float32)
    return x, cluster, queries


@pytest.fixture(scope="module")
def index(data) -> VectorIndex:
    built = build_index(ArraySource(data[0]), IndexOptions(exact_below=1000))
    assert built.kind == "ivf-flat" and built.nlist > 50
    return built


def exact(x, queries, k, ids=None):
    """Brute-force filtered top-k: (scores, ids) padded like search()."""
    ids = np.arange(1, len(x) + 1) if ids is None else np.array(sorted(ids), dtype=np.int64)
    scores = queries @ x[ids - 1].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.full((len(queries), k), -1, dtype=np.int64)
    top_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    top_ids[:, : order.shape[1]] = ids[order]
    top_scores[:, : order.shape[1]] = np.take_along_axis(scores, order, 1)
    return top_scores, top_ids


def recall(found, truth) -> float:
    """Mean share of the true (non-padding) neighbours found."""
    shares = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(shares))


def filters(cluster):
    """Rare, medium and common, independent of the clusters, and one cluster (correlated)."""
    rng = np.random.default_rng(1)
    return {
        "rare": SetFilter(rng.choice(N, 7, replace=False) + 1),
        "medium": SetFilter(rng.choice(N, 2500, replace=False) + 1),
        "common": SetFilter(rng.choice(N, 3800, replace=False) + 1),
        "one cluster": SetFilter(np.flatnonzero(cluster == 3) + 1),
    }


@pytest.mark.parametrize("strategy", ["exact", "ivf-filter", "postfilter"])
def test_every_strategy_matches_exact_filtered_search_when_probing_all_lists(index, data, strategy):
    x, cluster, queries = data
    for name, f in filters(cluster).items():
        scores, ids, plan = search(index, queries, K, filter=f, strategy=strategy, nprobe=index.nlist)
        want_scores, want_ids = exact(x, queries, K, f.ids())
        assert np.array_equal(ids, want_ids), (name, plan)
        assert np.allclose(scores, want_scores, atol=1e-5)


def test_planner_picks_by_selectivity_and_stays_close_to_exact(index, data):
    x, cluster, queries = data
    chosen = {}
    for name, f in filters(cluster).items():
        scores, ids, plan = search(index, queries, K, filter=f)
        chosen[name] = plan.strategy
        _, want = exact(x, queries, K, f.ids())
        assert recall(ids, want) >= 0.95, (name, plan)
        assert np.all((ids >= 0).sum(axis=1) == min(K, f.count()))
        assert np.all(-np.diff(scores[:, : min(K, f.count())], axis=1) >= -1e-6)  # best first
    assert chosen == {"rare": "exact", "medium": "ivf-filter", "common": "postfilter", "one cluster": "exact"}


def test_postfilter_never_fetches_all_matching_ids(index, data):
    f = filters(data[1])["common"]
    _, _, plan = search(index, data[2], K, filter=f)
    assert plan.strategy == "postfilter" and not plan.fallbacks
    assert f.calls["ids"] == 0 and f.calls["contains"] == 1


def test_rare_label_with_one_match(index, data):
    x, _, queries = data
    scores, ids, plan = search(index, queries, K, filter=SetFilter([1234]))
    assert plan.strategy == "exact" and plan.matching == 1
    assert np.all(ids[:, 0] == 1234) and np.all(ids[:, 1:] == -1)
    assert np.allclose(scores[:, 0], queries @ x[1233]) and np.all(np.isneginf(scores[:, 1:]))


def test_no_match_returns_empty_rows(index, data):
    f = SetFilter([])
    scores, ids, plan = search(index, data[2], K, filter=f)
    assert plan.strategy == "empty" and plan.matching == 0
    assert np.all(ids == -1) and np.all(np.isneginf(scores))
    assert f.calls["ids"] == 0


@pytest.mark.parametrize("strategy", ["auto", "exact", "ivf-filter", "postfilter"])
def test_k_larger_than_matches_returns_all_then_padding(index, data, strategy):
    x, _, queries = data
    members = [5, 50, 500, 1500, 3999]
    scores, ids, _ = search(index, queries, 20, filter=SetFilter(members), strategy=strategy)
    want_scores, want_ids = exact(x, queries, 20, members)
    assert np.array_equal(ids, want_ids)
    assert np.all(ids[:, 5:] == -1) and np.all(np.isneginf(scores[:, 5:]))


def test_no_filter_uses_ivf_and_matches_exact_when_exhaustive(index, data):
    x, _, queries = data
    scores, ids, plan = search(index, queries, K)
    assert plan.strategy == "ivf" and plan.matching is None and plan.nprobe == index.default_nprobe
    _, want = exact(x, queries, K)
    assert recall(ids, want) >= 0.95
    scores, ids, plan = search(index, queries, K, strategy="exact")
    assert plan.strategy == "exact" and np.array_equal(ids, want)


def test_ivf_short_of_results_falls_back_to_exact(index, data):
    x, cluster, queries = data
    far = SetFilter(np.flatnonzero(cluster == cluster[int(np.argmin(queries[0] @ x.T))]) + 1)
    _, ids, plan = search(index, queries, K, filter=far, strategy="postfilter", nprobe=1)
    assert plan.fallbacks, plan
    assert np.array_equal(ids, exact(x, queries, K, far.ids())[1])
    first = SetFilter(np.arange(1, 200))
    _, ids, plan = search(index, queries[:1], 50, filter=first, strategy="ivf-filter", nprobe=1)
    assert plan.fallbacks == {"exact": 1}
    assert np.array_equal(ids, exact(x, queries[:1], 50, np.arange(1, 200))[1])


def test_filter_ids_missing_from_the_index_are_ignored(index, data):
    x, _, queries = data
    f = SetFilter([10, 20, N + 100, 10**15])
    for strategy in ("auto", "ivf-filter", "postfilter"):
        _, ids, _ = search(index, queries, 3, filter=f, strategy=strategy)
        assert np.array_equal(ids, exact(x, queries, 3, [10, 20])[1])


def test_single_list_index_and_empty_index():
    x = np.eye(DIM, dtype=np.float32)[:5]
    small = build_index(ArraySource(x))
    assert small.kind == "flat"
    scores, ids, plan = search(small, x[1:2] + x[3:4] / 2, 3, filter=SetFilter([2, 4]))
    assert plan.strategy == "exact" and ids.tolist() == [[2, 4, -1]]
    assert scores[0, :2] == pytest.approx([1.0, 0.5])
    empty = build_index(ArraySource(np.zeros((0, DIM), dtype=np.float32)))
    for f in (None, SetFilter([1])):
        scores, ids, _ = search(empty, x[:2], 4, filter=f)
        assert np.all(ids == -1) and np.all(np.isneginf(scores))


def test_concurrent_readers_get_the_same_answers(index, data):
    x, cluster, queries = data
    fs = list(filters(cluster).values()) + [None]
    expected = [search(index, queries, K, filter=f)[1] for f in fs]
    errors = []

    def reader(i: int) -> None:
        for _ in range(20):
            got = search(index, queries, K, filter=fs[i % len(fs)])[1]
            if not np.array_equal(got, expected[i % len(fs)]):
                errors.append(i)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_arguments_are_refused(index, data):
    q = data[2]
    with pytest.raises(ValueError, match="unknown strategy"):
        search(index, q, K, strategy="hnsw")
    with pytest.raises(ValueError, match="needs a filter"):
        search(index, q, K, strategy="postfilter")
    with pytest.raises(ValueError, match="ignores filters"):
        search(index, q, K, filter=SetFilter([1]), strategy="ivf")
    with pytest.raises(ValueError, match="shape"):
        search(index, q[:, :5], K)
    with pytest.raises(ValueError, match="at least 1"):
        search(index, q, 0)


def test_plan_explains_itself(index, data):
    _, _, plan = search(index, data[2], K, filter=filters(data[1])["medium"])
    text = str(plan)
    assert plan.strategy in text and "matching segments: 2500" in text and "scan:" in text
    assert plan.distances > 0 and plan.nprobe is not None
