"""VectorIndex: building for every size, persistence (atomic, corruption-proof), and sync with SQLite."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from audiosearch.index import (
    IndexCorrupt,
    IndexOptions,
    VectorIndex,
    build_index,
    plan_nlist,
    sync_index,
)

DIM = 32
SMALL = IndexOptions(exact_below=1000)  # IVF from 1000 vectors, so tests stay fast


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, dim))
    x = (centers[rng.integers(8, size=n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class DictSource:
    """VectorSource over {id: vector}, standing in for the SQLite store."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.dim = vectors.shape[1]
        self.rows = {int(i): v for i, v in zip(ids, vectors)}

    def count(self) -> int:
        return len(self.rows)

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.rows), dtype=np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.rows[int(i)] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def iter_vectors(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = self.ids()
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            yield chunk, self.vectors(chunk)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        ids = self.ids()
        return self.vectors(np.random.default_rng(seed).choice(ids, min(n, len(ids)), replace=False))


def source(n: int, seed: int = 0, first_id: int = 1) -> DictSource:
    return DictSource(np.arange(first_id, first_id + n), unit_vectors(n, seed))


@pytest.mark.parametrize(
    "n, kind, nlist", [(0, "flat", 1), (1, "flat", 1), (999, "flat", 1), (3000, "ivf-flat", 76)]
)
def test_build_picks_exact_below_threshold_and_ivf_above(n, kind, nlist):
    index = build_index(source(n), SMALL)
    assert (index.kind, index.nlist, index.ntotal, index.trained_for) == (kind, nlist, n, n)
    assert np.array_equal(index.ids(), np.arange(1, n + 1))
    assert index.describe()["factory"] == f"IVF{nlist},Flat"


def test_nlist_grows_with_sqrt_n_and_is_capped_on_cpu():
    cpu = IndexOptions(device="cpu")
    assert plan_nlist(9_999, cpu) == 1
    assert plan_nlist(100_000, cpu) == round(4 * 100_000**0.5)
    assert plan_nlist(10_000, cpu) == 10_000 // 39  # k-means needs >= 39 points per list
    assert plan_nlist(100_000_000, cpu) == 4096


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        plan_nlist(50_000, IndexOptions(device="tpu"))


def test_over_memory_budget_stores_fp16():
    src = source(3000)
    index = build_index(src, IndexOptions(exact_below=1000, memory_budget_bytes=1000))
    assert index.kind == "ivf-sqfp16"
    got = index.reconstruct(np.array([5, 17]))
    assert np.allclose(got, src.vectors(np.array([5, 17])), atol=2e-3)
    assert not np.array_equal(got, src.vectors(np.array([5, 17])))  # really fp16 codes


def test_flat_over_memory_budget_stores_fp16():
    index = build_index(source(10), IndexOptions(memory_budget_bytes=100))
    assert index.kind == "flat-sqfp16"
    assert np.allclose(index.reconstruct(np.array([3])), source(10).vectors(np.array([3])), atol=2e-3)


@pytest.mark.parametrize("n", [0, 1, 3000])
def test_save_load_round_trip_is_bit_exact(tmp_path, n):
    src = source(n, first_id=100)
    index = build_index(src, SMALL)
    index.generation = 7
    path = tmp_path / "vectors.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.describe() == index.describe()
    assert (loaded.generation, loaded.trained_for) == (7, n)
    assert np.array_equal(loaded.ids(), src.ids())
    assert np.array_equal(loaded.reconstruct(src.ids()), src.vectors(src.ids()))
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]


def test_loaded_index_accepts_adds(tmp_path):
    path = tmp_path / "vectors.faiss"
    build_index(source(3000), SMALL).save(path)
    index = VectorIndex.load(path)
    index.add(np.array([5000]), unit_vectors(1, seed=9))
    assert index.ntotal == 3001
    assert np.array_equal(index.reconstruct(np.array([5000])), unit_vectors(1, seed=9))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch, failing):
    path = tmp_path / "vectors.faiss"
    build_index(source(10), SMALL).save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        build_index(source(50, seed=1), SMALL).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert VectorIndex.load(path).ntotal == 10
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]  # no temp file left behind


def test_truncated_file_is_corrupt_not_a_crash(tmp_path):
    path = tmp_path / "vectors.faiss"
    build_index(source(3000), SMALL).save(path)
    data = path.read_bytes()
    for cut in (0, 5, 30, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(IndexCorrupt, match="rebuilt from SQLite"):
            VectorIndex.load(path)


def test_garbage_payload_is_corrupt(tmp_path):
    path = tmp_path / "vectors.faiss"
    build_index(source(100), SMALL).save(path)
    data = path.read_bytes()
    _, _, meta_len = struct.unpack("<8sQI", data[:20])
    keep = 20 + meta_len + 4  # header, metadata and FAISS' type tag stay; the rest is scrambled
    path.write_bytes(data[:keep] + b"\xff" * (len(data) - keep))
    with pytest.raises(IndexCorrupt, match="checksum mismatch"):  # never handed to FAISS' parser
        VectorIndex.load(path)


def test_other_file_is_corrupt_and_missing_file_is_not_found(tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(b"SQLite format 3\x00" + bytes(100))
    with pytest.raises(IndexCorrupt, match="not an audiosearch index"):
        VectorIndex.load(other)
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "absent.faiss")


def test_add_remove_reconstruct_with_arbitrary_ids():
    index = build_index(source(0), SMALL)
    ids = np.array([7, 10**12, 3])
    vectors = unit_vectors(3, seed=4)
    index.add(ids, vectors)
    assert np.array_equal(index.ids(), [3, 7, 10**12])
    assert np.array_equal(index.reconstruct(np.array([10**12, 3])), vectors[[1, 2]])
    assert index.remove(np.array([7, 8])) == 1
    assert np.array_equal(index.ids(), [3, 10**12])
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct(np.array([7]))


def test_add_refuses_duplicates_and_bad_shapes():
    index = build_index(source(5), SMALL)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.array([5]), unit_vectors(1))
    with pytest.raises(ValueError, match="unique"):
        index.add(np.array([9, 9]), unit_vectors(2))
    with pytest.raises(ValueError, match="dim"):
        index.add(np.array([9]), np.zeros((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([-2]), unit_vectors(1))
    assert index.ntotal == 5


def test_sync_builds_when_there_is_no_index():
    index, report = sync_index(None, source(20), SMALL)
    assert index.ntotal == 20
    assert (report.rebuilt, report.added, report.removed) == (True, 20, 0)
    assert report.reason == "no index yet"


def test_sync_adds_and_removes_the_difference():
    src = source(3000)
    index = build_index(src, SMALL)
    for i in range(1, 11):
        del src.rows[i]
    for i, v in zip(range(5000, 5005), unit_vectors(5, seed=3)):
        src.rows[i] = v
    synced, report = sync_index(index, src, SMALL)
    assert synced is index
    assert (report.added, report.removed, report.rebuilt, report.reason) == (5, 10, False, None)
    assert np.array_equal(index.ids(), src.ids())
    assert np.array_equal(index.reconstruct(src.ids()), src.vectors(src.ids()))


def test_sync_rebuilds_when_the_collection_outgrows_the_index():
    index = build_index(source(500), SMALL)
    assert index.kind == "flat"
    grown = source(4000)
    assert index.needs_rebuild(grown.count(), SMALL) is not None
    synced, report = sync_index(index, grown, SMALL)
    assert report.rebuilt and "nlist=" in report.reason
    assert (synced.kind, synced.ntotal, synced.trained_for) == ("ivf-flat", 4000, 4000)


def test_needs_rebuild_thresholds():
    index = build_index(source(3000), SMALL)  # 76 lists
    assert index.needs_rebuild(3000, SMALL) is None
    assert index.needs_rebuild(5000, SMALL) is None  # wants 128 lists: not yet 2x
    assert "nlist=153;" in index.needs_rebuild(6000, SMALL)  # 6000 // 39
    assert index.needs_rebuild(1400, SMALL) is None  # wants 35 lists, but n only halved
    assert "call for nlist=1;" in index.needs_rebuild(750, SMALL)  # quartered: back to exact search
    tight = IndexOptions(exact_below=1000, memory_budget_bytes=3000 * DIM * 4)
    assert "memory budget" in index.needs_rebuild(3001, tight)


def test_sync_rebuilds_when_the_dimension_changes():
    index = build_index(source(10), SMALL)
    other = DictSource(np.arange(1, 11), unit_vectors(10, dim=DIM * 2))
    synced, report = sync_index(index, other, SMALL)
    assert report.rebuilt and "dimension" in report.reason
    assert synced.dim == DIM * 2


def test_empty_index_saves_and_loads(tmp_path):
    path = tmp_path / "empty.faiss"
    build_index(source(0), SMALL).save(path)
    index = VectorIndex.load(path)
    assert (index.ntotal, index.kind, len(index.ids())) == (0, "flat", 0)
    assert index.reconstruct(np.array([], dtype=np.int64)).shape == (0, DIM)


def test_gpu_kmeans_keeps_its_clustering_index_alive_while_training(monkeypatch):
    """The GPU path (simulated with a CPU index): FAISS holds only a raw pointer to
    `clustering_index`, so the Python object that owns it must outlive `train`."""
    import faiss

    events: list[str] = []

    class Tracked(faiss.IndexFlatIP):
        def __del__(self):
            events.append("freed")

    made: list[faiss.Index] = []

    def to_all_gpus(index, co=None, ngpu=-1):
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT  # same assignment as the CPU path
        out = Tracked(index.d)
        made.append(type(out))
        return out

    real_train = faiss.IndexIVFFlat.train

    def train(self, x):
        events.append("train")
        return real_train(self, x)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", train)
    index = build_index(source(3000), IndexOptions(exact_below=1000, device="gpu"))
    assert made and events == ["train", "freed"]
    assert index.kind == "ivf-flat" and index.ntotal == 3000
