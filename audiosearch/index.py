"""The FAISS index over segment embeddings: derived from SQLite, rebuildable at any time.

Every index is a FAISS IVF index over inner product (vectors are L2-normalised)
with caller-chosen int64 ids and a hashtable direct map, so ids can be
reconstructed and removed one by one. Small collections get one inverted list
("IVF1,Flat"): search is then exhaustive, but the API is the same as for a
trained index. Collections larger than the memory budget store fp16 codes.

The file format is a short header (magic, payload length, JSON metadata)
followed by the FAISS serialisation, written atomically. A reader never memory
maps it: adding to an mmapped FAISS index aborts the process.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import xxhash

MAGIC = b"ASFAISS1"
_HEADER = struct.Struct("<8sQI")  # magic, payload bytes, metadata bytes
# 2: a trailer of XXH3-128 over metadata + payload. FAISS trusts the sizes and offsets it reads (a
# flipped byte can make it read out of bounds), so a file is parsed only once its checksum holds.
# Files of format 1 have none: they count as damaged and are rebuilt from SQLite.
FORMAT_VERSION = 2
_DIGEST_BYTES = 16
_CHECK_BLOCK = 1 << 20

MIN_POINTS_PER_LIST = 39  # FAISS warns below this: k-means has too little data per centroid
MAX_POINTS_PER_LIST = 256  # FAISS subsamples above this anyway
HASHTABLE_BYTES_PER_ID = 48  # std::unordered_map node + bucket, for the memory estimate

# Default nprobe for an unfiltered search, from `python -m benchmarks.search`
# (clustered synthetic 768-d unit vectors, see BENCHMARKS.md).
# Mean recall@10 against exact search by nprobe:
#   n=10k,  nlist 256:  8 -> 0.987,  12 -> 0.9915, 16 -> 0.9935, 24 -> 0.996
#   n=100k, nlist 1265: 8 -> 0.9855, 12 -> 0.991,  24 -> 0.9925, 64 -> 0.9935
#   n=1M,   nlist 4000: 8 -> 0.992,  16 -> 0.993,  32 -> 0.997,  48 -> 0.999
# 0.99 is first reached at 8-12; the default is 2-3x that (24, or nlist/128
# when larger: 32 at 1M) because real embeddings may have a longer tail.
NPROBE_FRACTION = 1 / 128
MIN_NPROBE = 24


class VectorSource(Protocol):
    """Where the vectors come from (the SQLite store); ids are segment ids."""

    dim: int

    def count(self) -> int: ...

    def ids(self) -> np.ndarray: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...

    def iter_vectors(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def sample(self, n: int, seed: int = 0) -> np.ndarray: ...


class IndexCorrupt(Exception):
    """The index file cannot be read; it is derived data, so rebuild it from SQLite."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"index file {path} is unreadable ({detail}); it can be rebuilt from SQLite")
        self.path = path


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index. The defaults suit 2-core laptops up to ~10M segments.

    nlist is about `nlist_per_sqrt_n * sqrt(n)`: a query costs nlist coarse
    distances plus nprobe * n / nlist vector distances, least near
    nlist = sqrt(nprobe * n), i.e. 5-6 sqrt(n) at nprobe 24-32. 4 sqrt(n) is
    a little under that because k-means time grows with nlist squared: at 1M
    vectors (4000 lists) training plus adding took 3-4 minutes on 2 cores.
    """

    memory_budget_bytes: int = 8 << 30  # above this, store fp16 codes: 10M x 768 then takes ~15 GiB
    device: str = "auto"  # where k-means runs: "auto" (GPU when FAISS sees one), "cpu" or "gpu"
    max_nlist_cpu: int = 4096  # k-means for 65536 lists takes hours on 2 cores
    max_nlist_gpu: int = 65536
    exact_below: int = 10_000  # fewer segments: one list, exhaustive search (< 2 ms a query)
    nlist_per_sqrt_n: float = 4.0
    train_points_per_list: int = 64  # between FAISS' 39 minimum and 256 maximum; k-means cost is linear in it
    kmeans_iters: int = 10  # FAISS' default for IVF training
    rebuild_factor: int = 2  # rebuild when the nlist policy wants 2x more lists (n grew ~4x); see needs_rebuild
    batch_size: int = 16_384  # vectors per add call (48 MiB of float32)
    seed: int = 0


@dataclass
class SyncReport:
    """What sync_index did."""

    added: int
    removed: int
    rebuilt: bool
    reason: str | None


def dense(max_id: int, count: int) -> bool:
    """Whether per-id arrays up to max_id are affordable for `count` ids (SQLite rowids are)."""
    return max_id < 8 * count + (1 << 20)


@dataclass(frozen=True)
class Layout:
    """Where each id lives, from one walk of the inverted lists.

    When ids are dense (SQLite rowids), `list_of` maps an id straight to its
    list: 4 bytes per id up to the largest, i.e. 40 MB for 10M segments.
    Otherwise ids are looked up by binary search.
    """

    ids: np.ndarray  # sorted int64
    id_lists: np.ndarray  # int32 list number of ids[i]
    sizes: np.ndarray  # int64 number of ids per list
    list_of: np.ndarray | None  # int32 list number indexed by id, -1 for ids not held (and one past the end)

    def lists(self, ids: np.ndarray) -> np.ndarray:
        """List number of each (non-negative) id, -1 where the index does not hold it."""
        if self.list_of is not None:
            return np.take(self.list_of, ids, mode="clip")  # ids past the end clip to the -1 sentinel
        out = np.full(len(ids), -1, dtype=np.int32)
        if len(self.ids):
            pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
            held = self.ids[pos] == ids
            out[held] = self.id_lists[pos[held]]
        return out


def default_nprobe(nlist: int) -> int:
    """Lists probed by an unfiltered search (calibrated, see NPROBE_FRACTION)."""
    return min(nlist, max(MIN_NPROBE, math.ceil(nlist * NPROBE_FRACTION)))


def plan_nlist(n: int, options: IndexOptions = IndexOptions()) -> int:
    """Number of inverted lists for n vectors; 1 means exact search."""
    if n < options.exact_below:
        return 1
    cap = options.max_nlist_gpu if _use_gpu(options) else options.max_nlist_cpu
    return max(1, min(round(options.nlist_per_sqrt_n * math.sqrt(n)), n // MIN_POINTS_PER_LIST, cap))


def _use_gpu(options: IndexOptions) -> bool:
    if options.device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', not {options.device!r}")
    gpus = faiss.get_num_gpus() if options.device != "cpu" else 0
    if options.device == "gpu" and gpus == 0:
        raise ValueError("device='gpu' but FAISS sees no GPU (is faiss-gpu installed and CUDA visible?)")
    return gpus > 0


def _compressed(n: int, dim: int, options: IndexOptions) -> bool:
    return n * dim * 4 > options.memory_budget_bytes


class VectorIndex:
    """A FAISS IVF index with segment ids. Readers may share it; writers need exclusive access."""

    def __init__(self, ivf: faiss.IndexIVF, trained_for: int, generation: int | None = None):
        self.ivf = ivf
        self.trained_for = trained_for
        self.generation = generation  # the store generation this index reflects, saved in the file header
        self._layout: Layout | None = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.ivf.d

    @property
    def ntotal(self) -> int:
        return self.ivf.ntotal

    @property
    def nlist(self) -> int:
        return self.ivf.nlist

    @property
    def compressed(self) -> bool:
        return isinstance(self.ivf, faiss.IndexIVFScalarQuantizer)

    @property
    def kind(self) -> str:
        """'flat' / 'ivf-flat', with '-sqfp16' in place of 'flat' storage when compressed."""
        if self.nlist == 1:
            return "flat-sqfp16" if self.compressed else "flat"
        return "ivf-sqfp16" if self.compressed else "ivf-flat"

    @property
    def factory(self) -> str:
        return f"IVF{self.nlist},{'SQfp16' if self.compressed else 'Flat'}"

    @property
    def default_nprobe(self) -> int:
        return default_nprobe(self.nlist)

    # -- persistence ---------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        """Read an index file into memory (never mmapped). Raises IndexCorrupt or FileNotFoundError."""
        path = Path(path)
        with open(path, "rb") as f:
            meta, end = _read_header(f, path)
            start = f.tell()
            _check_digest(f, path, start, end)
            f.seek(start)
            try:
                ivf = faiss.read_index(faiss.PyCallbackIOReader(f.read))
            except (RuntimeError, MemoryError) as e:
                raise IndexCorrupt(path, f"FAISS could not parse it: {str(e).splitlines()[-1][:200]}") from e
            if f.tell() != end:
                raise IndexCorrupt(path, "FAISS data does not fill the file")
        generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
        return cls(_check_ivf(ivf, path), int(meta.get("trained_for", 0)), generation)

    def save(self, path: Path) -> None:
        """Write atomically: a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
        path = Path(path)
        tag = {"format": FORMAT_VERSION, "trained_for": self.trained_for, "generation": self.generation}
        meta = json.dumps(tag).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(MAGIC, 0, len(meta)) + meta)
                digest = xxhash.xxh3_128(meta)

                def write(data: bytes) -> int:
                    digest.update(data)
                    return f.write(data)

                faiss.write_index(self.ivf, faiss.PyCallbackIOWriter(write))
                payload = f.tell() - _HEADER.size - len(meta)
                f.write(digest.digest())
                f.seek(0)
                f.write(_HEADER.pack(MAGIC, payload, len(meta)))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    # -- contents ------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids; ids already present are refused (FAISS would keep both copies)."""
        ids, vectors = self._check_batch(ids, vectors)
        dupes = np.intersect1d(ids, self.ids(), assume_unique=True)
        if len(dupes):
            first = int(dupes[0])
            raise ValueError(f"{len(dupes)} ids are already in the index (first: {first}); remove them first")
        self._add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        removed = self.ivf.remove_ids(faiss.IDSelectorArray(ids))  # the hashtable map needs an IDSelectorArray
        self._layout = None
        return int(removed)

    def ids(self) -> np.ndarray:
        """All ids held, sorted (read-only)."""
        return self.layout().ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ids, in order (fp16-rounded when compressed). KeyError for unknown ids."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            return self.ivf.reconstruct_batch(ids)
        except RuntimeError as e:
            unknown = np.setdiff1d(ids, self.ids())
            if len(unknown) == 0:
                raise
            raise KeyError(f"{len(unknown)} ids are not in the index (first: {int(unknown[0])})") from e

    def layout(self) -> Layout:
        """Sorted ids, the list each is in, and list sizes; cached until the next add/remove."""
        with self._lock:
            if self._layout is None:
                self._layout = _walk_lists(self.ivf)
            return self._layout

    def needs_rebuild(self, n: int, options: IndexOptions = IndexOptions()) -> str | None:
        """Why an index holding n vectors should be rebuilt, or None if it is fine as it is.

        Rebuild when the nlist policy wants `rebuild_factor` times more lists, or
        fewer lists after n shrank that many times squared (nlist ~ sqrt(n)): the
        gap between the two thresholds keeps a collection hovering around one
        of them from being rebuilt at every sync.
        """
        want, factor = plan_nlist(n, options), options.rebuild_factor
        grown = want >= factor * self.nlist
        shrunk = want < self.nlist and n * factor**2 <= self.trained_for
        if grown or shrunk:
            return f"{n} segments call for nlist={want}; the index has {self.nlist} (built for {self.trained_for})"
        if not self.compressed and _compressed(n, self.dim, options):
            gib = n * self.dim * 4 / 2**30
            return f"{n} float32 vectors ({gib:.1f} GiB) exceed the memory budget; storing fp16 instead"
        return None

    def describe(self) -> dict:
        """Summary for `audiosearch info`."""
        code_size = 2 * self.dim if self.compressed else 4 * self.dim
        memory = self.ntotal * (code_size + 8 + HASHTABLE_BYTES_PER_ID) + self.nlist * self.dim * 4
        return {
            "kind": self.kind, "factory": self.factory, "nlist": self.nlist, "ntotal": self.ntotal,
            "dim": self.dim, "trained_for": self.trained_for, "default_nprobe": self.default_nprobe,
            "memory_bytes": memory,
        }

    def _check_batch(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} vectors of dim {self.dim}, got shape {vectors.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids passed to add() must be unique")
        if len(ids) and ids.min() < 0:
            raise ValueError("ids must be non-negative (FAISS uses -1 for 'no result')")
        return ids, vectors

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.ivf.add_with_ids(vectors, ids)
            self._layout = None


def _walk_lists(ivf: faiss.IndexIVF) -> Layout:
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    chunks = [np.zeros(0, dtype=np.int64)]
    for i in np.flatnonzero(sizes):
        ptr = invlists.get_ids(int(i))
        chunks.append(faiss.rev_swig_ptr(ptr, int(sizes[i])).copy())
        invlists.release_ids(int(i), ptr)
    ids = np.concatenate(chunks)
    id_lists = np.repeat(np.arange(ivf.nlist, dtype=np.int32), sizes)
    order = np.argsort(ids)
    ids, id_lists = ids[order], id_lists[order]
    list_of = None
    if len(ids) and dense(int(ids[-1]), len(ids)):
        list_of = np.full(int(ids[-1]) + 2, -1, dtype=np.int32)
        list_of[ids] = id_lists
    for a in (ids, id_lists, sizes, list_of):
        if a is not None:
            a.flags.writeable = False
    return Layout(ids, id_lists, sizes, list_of)


def _read_header(f, path: Path) -> tuple[dict, int]:
    """Parse and check the header; returns the metadata and the offset where the FAISS data ends."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise IndexCorrupt(path, "not an audiosearch index file")
    _, payload_bytes, meta_len = _HEADER.unpack(head)
    size, end = os.fstat(f.fileno()).st_size, _HEADER.size + meta_len + payload_bytes
    if size == end:
        raise IndexCorrupt(path, "written by an older version (no checksum)")
    if size != end + _DIGEST_BYTES:  # checked before reading: a damaged length must not size a read
        raise IndexCorrupt(path, f"truncated or incomplete: {size} bytes, expected {end + _DIGEST_BYTES}")
    try:
        meta = json.loads(f.read(meta_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexCorrupt(path, "damaged header") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise IndexCorrupt(path, "unknown format version")
    return meta, end


def _check_digest(f, path: Path, start: int, end: int) -> None:
    """The metadata and FAISS bytes must hash to the trailer: nothing damaged reaches FAISS' parser."""
    f.seek(_HEADER.size)
    digest = xxhash.xxh3_128(f.read(start - _HEADER.size))
    left = end - start
    while left > 0:
        block = f.read(min(_CHECK_BLOCK, left))
        if not block:
            break
        digest.update(block)
        left -= len(block)
    if left or f.read(_DIGEST_BYTES) != digest.digest():
        raise IndexCorrupt(path, "checksum mismatch: the file is damaged")


def _check_ivf(ivf: faiss.Index, path: Path) -> faiss.IndexIVF:
    """read_index returns the concrete class; it must be one build_index makes."""
    if not isinstance(ivf, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        raise IndexCorrupt(path, f"unexpected index type {type(ivf).__name__}")
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT or ivf.direct_map.type != faiss.DirectMap.Hashtable:
        raise IndexCorrupt(path, "not an inner-product index with an id hashtable")
    return ivf


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- building --------------------------------------------------------------
def build_index(source: VectorSource, options: IndexOptions = IndexOptions()) -> VectorIndex:
    """A new index over everything in `source`, its type and size chosen from the number of vectors."""
    n, dim = source.count(), source.dim
    nlist = plan_nlist(n, options)
    kind = "SQfp16" if _compressed(n, dim, options) else "Flat"
    ivf = faiss.index_factory(dim, f"IVF{nlist},{kind}", faiss.METRIC_INNER_PRODUCT)
    if nlist == 1:
        _single_list(ivf)
    else:
        _train(ivf, source.sample(_train_size(n, nlist, options), seed=options.seed), options)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    index = VectorIndex(ivf, trained_for=n)
    for ids, vectors in source.iter_vectors(options.batch_size):
        index._add(*index._check_batch(ids, vectors))
    return index


def _train_size(n: int, nlist: int, options: IndexOptions) -> int:
    per_list = min(max(options.train_points_per_list, MIN_POINTS_PER_LIST), MAX_POINTS_PER_LIST)
    return min(n, per_list * nlist)


def _single_list(ivf: faiss.IndexIVF) -> None:
    """One list needs no k-means: its centroid only matters as the residual origin, so use 0."""
    ivf.quantizer.add(np.zeros((1, ivf.d), dtype=np.float32))
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        ivf.train(np.zeros((1, ivf.d), dtype=np.float32))  # fp16 needs no statistics; this sets is_trained
    ivf.is_trained = True


def _train(ivf: faiss.IndexIVF, sample: np.ndarray, options: IndexOptions) -> None:
    """Spherical k-means for the coarse quantizer, on the GPU when there is one."""
    ivf.cp.niter = options.kmeans_iters
    ivf.cp.seed = options.seed
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if _use_gpu(options):
        # FAISS' recipe for training a CPU IVF index on GPUs (faiss wiki, FAQ): only the
        # k-means assignment runs there; the quantizer and the index stay on the CPU.
        # The IVF holds a raw pointer: keep the Python object (which owns the GPU index and its
        # resources) alive until training is done, or FAISS trains on freed memory. Inner product,
        # like the CPU path's IndexFlatIP quantizer (spherical k-means).
        clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        ivf.clustering_index = clustering_index
        try:
            ivf.train(sample)
        finally:
            ivf.clustering_index = None
            del clustering_index
    else:
        ivf.train(sample)


# -- keeping up with SQLite -------------------------------------------------
def sync_index(
    index: VectorIndex | None, source: VectorSource, options: IndexOptions = IndexOptions()
) -> tuple[VectorIndex, SyncReport]:
    """Bring `index` up to date with `source`: rebuild when needed, else add and remove the difference."""
    n = source.count()
    reason = _rebuild_reason(index, source, n, options)
    if reason is not None:
        new = build_index(source, options)
        return new, SyncReport(added=new.ntotal, removed=index.ntotal if index else 0, rebuilt=True, reason=reason)
    have, want = index.ids(), source.ids()
    extra = np.setdiff1d(have, want, assume_unique=True)
    missing = np.setdiff1d(want, have, assume_unique=True)
    removed = index.remove(extra)
    for start in range(0, len(missing), options.batch_size):
        chunk = missing[start : start + options.batch_size]
        index.add(chunk, source.vectors(chunk))
    return index, SyncReport(added=len(missing), removed=removed, rebuilt=False, reason=None)


def _rebuild_reason(index: VectorIndex | None, source: VectorSource, n: int, options: IndexOptions) -> str | None:
    if index is None:
        return "no index yet"
    if index.dim != source.dim:
        return f"vector dimension changed from {index.dim} to {source.dim}"
    return index.needs_rebuild(n, options)
