"""The print lookup index: every stored triplet key, sorted, pointing at (fingerprint, time, band, span).

Derived from the fingerprints in SQLite, like `vectors.faiss` from the
segments. It is a small log-structured store so that it scales to 10,000
hours without rewriting gigabytes on every ingest:

- *runs*: immutable files, each the sorted keys of some fingerprints plus
  their entries (8 bytes each, packed: see `pack`), memory-mapped when read;
- a *manifest* (`prints.json`), replaced atomically, that names the live
  runs, the fingerprint ids removed since (masked at lookup time), and the
  store generation it reflects.

A sync adds a run for the fingerprints SQLite has and the runs lack, masks
the ones it no longer has, and merges all runs into one when there are too
many or too much is masked. A reader whose manifest is stale does the same in
memory, so a lookup always sees the last commit (see Collection).
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import xxhash

from .fingerprint import KEY_BITS, KEYS_VERSION, VERSION, Fingerprint, keys, triplets

MANIFEST = "prints.json"
RUN_GLOB = "prints-*.run"
MAGIC = b"ASPRINT4"
# magic, ids, entries, offsets, checksum (xxh64) of the body, checksum of the fingerprint ids alone: those
# are checked on every load (a damaged id would send one file's matches to another), the body by doctor
_HEADER = struct.Struct("<8sQQQQQ")
DENSE_ENTRIES = 1 << 27  # a run this big keeps a bucket table instead of its keys (see Run): the table (512 MiB) is then smaller
MAX_RUNS = 8  # more and a sync merges them: each lookup binary-searches every run
MAX_MASKED = 0.25  # merge when this share of the covered fingerprints is gone
MAX_BUCKET = 4096  # a key held by more entries than this says nothing (silence, hum): it is not probed

# A collision as verification reads it: fingerprint id, anchor time (ms), anchor band x 64, span (ms).
ENTRY = np.dtype([("fp", "<u4"), ("ms", "<u4"), ("band", "<u2"), ("span", "<u2")])
# The same as a run stores it, in 8 bytes (12 at 10,000 hours would be 24 GB, more than a 24 GiB
# machine can keep in memory), low to high: span in 8 ms steps (8 bits), anchor band in fifths
# (9), anchor time in 8 ms steps (24: the first 37 h of a file), and the fingerprint's place in
# the run's `ids` (23). Peak times fall on 8 ms (short sounds) or 32 ms frames, so time and span
# lose nothing; the band moves by at most a tenth of one.
PACKED = np.dtype("<u8")
_SPAN_BITS, _BAND_BITS, _TIME_BITS, _ORDINAL_BITS = 8, 9, 24, 23
TIME_STEP_MS, BAND_STEPS = 8, 5
MAX_RUN_FINGERPRINTS = 1 << _ORDINAL_BITS  # fingerprints one run can hold (8.4 M)
MAX_INDEXED_MS = TIME_STEP_MS * ((1 << _TIME_BITS) - 1)  # triplets later in a file are not indexed


class PrintSource(Protocol):
    """Where fingerprints come from (the SQLite store)."""

    def print_ids(self) -> np.ndarray: ...

    def iter_prints(self, ids: np.ndarray, batch_size: int = 512): ...


# A choice of collisions from what they say before unpacking: (probe index, ordinal, ms) -> bool mask.
Keep = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class LookupCorrupt(Exception):
    """A run or the manifest cannot be read; the lookup index is derived, so rebuild it from SQLite."""


class LookupOutdated(LookupCorrupt):
    """The lookup files were made by another fingerprint or key version: rebuild them from SQLite."""


@dataclass
class Run:
    """One immutable sorted run: the fingerprint ids it covers, its keys and their entries.

    A small run is binary-searched. A big one (DENSE_ENTRIES or more) keeps, instead of its
    keys, where each key's entries start (2**KEY_BITS + 1 offsets, 512 MiB): a probe is then
    two reads wherever its key lies, instead of ~30 cache misses through a sorted array
    (2 billion entries at 10,000 hours), and the run drops its 4-byte keys.
    """

    ids: np.ndarray  # int64, ascending
    keys: np.ndarray  # uint32, ascending; empty when `offsets` is given
    entries: np.ndarray  # PACKED, in key order
    name: str | None = None  # file name once saved
    offsets: np.ndarray | None = None  # uint64 [2**KEY_BITS + 1], for dense runs

    @property
    def nbytes(self) -> int:
        extra = self.offsets.nbytes if self.offsets is not None else 0
        return self.ids.nbytes + self.keys.nbytes + self.entries.nbytes + extra

    def __len__(self) -> int:
        return len(self.entries)

    def ranges(self, probe_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each probe key's entries start and end."""
        if self.offsets is not None:
            offsets = np.asarray(self.offsets)  # a memory map; take() from its plain view is 2x faster than [...]
            return (np.take(offsets, probe_keys).astype(np.int64),
                    np.take(offsets, probe_keys.astype(np.int64) + 1).astype(np.int64))
        # sorted needles: each binary search starts where the last ended (3x faster on 25k probes)
        order = np.argsort(probe_keys, kind="stable")
        lo, hi = np.empty(len(order), np.int64), np.empty(len(order), np.int64)
        lo[order] = np.searchsorted(self.keys, probe_keys[order], side="left")
        hi[order] = np.searchsorted(self.keys, probe_keys[order], side="right")
        return lo, hi

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Entries of this run (PACKED) as ENTRY, with their fingerprint ids."""
        return unpack(packed, self.ids)

    @staticmethod
    def places(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each entry's fingerprint ordinal in this run and its anchor time in ms: what a
        collision says before it is unpacked (ordinals stand for fingerprints within one run)."""
        low, high = _halves(packed)
        return _ordinal(high), _time_ms(low, high)

    def all_keys(self) -> np.ndarray:
        """Every entry's key (rebuilt from the offsets of a dense run)."""
        if self.offsets is None:
            return np.asarray(self.keys)
        return np.repeat(np.arange(len(self.offsets) - 1, dtype=np.uint32), np.diff(self.offsets).astype(np.int64))


@dataclass
class SyncReport:
    added: int
    removed: int
    merged: bool


@dataclass
class PrintLookup:
    """The runs plus the ids masked since they were written."""

    runs: list[Run] = field(default_factory=list)
    masked: set[int] = field(default_factory=set)
    generation: int = -1

    # -- contents ------------------------------------------------------------
    def covered(self) -> np.ndarray:
        ids = np.concatenate([r.ids for r in self.runs]) if self.runs else np.zeros(0, np.int64)
        return np.setdiff1d(ids, np.fromiter(self.masked, np.int64, len(self.masked)))

    @property
    def entries(self) -> int:
        return sum(len(r) for r in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def describe(self) -> dict:
        return {"runs": len(self.runs), "entries": self.entries, "bytes": self.nbytes,
                "fingerprints": int(len(self.covered())), "generation": self.generation}

    # -- lookups -----------------------------------------------------------------
    def lookup(self, probe_keys: np.ndarray, keep: Keep | None = None, *,
               max_held: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Entries stored under each probe key: (probe index, entry) pairs, masked fingerprints left out.

        A key is not probed in a run where it holds more than MAX_BUCKET entries, nor at all where
        the runs together hold more than `max_held`. `keep(probe, ordinal, ms)` says which of a
        run's collisions to unpack (see Run.places): at 10,000 hours a 10 s clip meets ~2 M chance
        collisions, and unpacking them all cost more than finding them.
        """
        probe_keys = np.asarray(probe_keys, dtype=np.uint32)
        unique, inverse = np.unique(probe_keys, return_inverse=True)  # each key searched once, in order
        inverse = inverse.reshape(-1)
        spans = [run.ranges(unique) for run in self.runs]
        held = sum((hi - lo for lo, hi in spans), np.zeros(len(unique), np.int64))
        found_probe, found_entries = [], []
        for run, (lo, hi) in zip(self.runs, spans):
            count = hi - lo
            count[count > MAX_BUCKET] = 0
            if max_held is not None:
                count[held > max_held] = 0
            lo, count = lo[inverse], count[inverse]
            total = int(count.sum())
            if total == 0:
                continue
            probe = np.repeat(np.arange(len(probe_keys)), count)
            starts = np.repeat(lo - np.cumsum(count) + count, count)
            packed = np.take(np.asarray(run.entries), starts + np.arange(total))
            if keep is not None:
                chosen = np.nonzero(keep(probe, *run.places(packed)))[0]
                probe, packed = probe[chosen], packed[chosen]
            found_probe.append(probe)
            found_entries.append(run.unpack(packed))
        if not found_probe:
            return np.zeros(0, np.int64), np.zeros(0, ENTRY)
        probe, entries = np.concatenate(found_probe), np.concatenate(found_entries)
        keep = entries["fp"] != 0  # see unpack
        if self.masked:
            keep &= ~np.isin(entries["fp"], np.fromiter(self.masked, np.int64, len(self.masked)))
        if not keep.all():
            probe, entries = probe[keep], entries[keep]
        return probe, entries

    # -- keeping up with SQLite --------------------------------------------------
    def sync(self, source: PrintSource) -> SyncReport:
        """Bring the runs up to the fingerprints `source` holds (call inside one snapshot of it)."""
        live = source.print_ids()
        covered = self.covered()
        gone = np.setdiff1d(covered, live)
        new = np.setdiff1d(live, covered)
        self.masked.update(int(i) for i in gone)
        for lo in range(0, len(new), MAX_RUN_FINGERPRINTS):
            self.runs.append(build_run(new[lo:lo + MAX_RUN_FINGERPRINTS], source))
        merged = False
        total = sum(len(r.ids) for r in self.runs)
        fits = total - len(self.masked) <= MAX_RUN_FINGERPRINTS
        if fits and (len(self.runs) > MAX_RUNS or (total and len(self.masked) > MAX_MASKED * total)):
            self.runs = [merge_runs(self.runs, self.masked)] if self.runs else []
            self.masked = set()
            merged = True
        return SyncReport(added=int(len(new)), removed=int(len(gone)), merged=merged)


def build_run(ids: np.ndarray, source: PrintSource) -> Run:
    """A sorted run of the triplet keys of the given fingerprints."""
    all_keys, all_entries, covered = [], [], []
    for batch in source.iter_prints(ids):
        for fp_id, version, data in batch:
            covered.append(fp_id)
            if version != VERSION:
                continue  # made by another fingerprint version: re-ingest to match it
            k, e = entries_of(fp_id, Fingerprint.from_bytes(data))
            all_keys.append(k)
            all_entries.append(e)
    return sorted_run(np.array(sorted(covered), dtype=np.int64), all_keys, all_entries)


def entries_of(fp_id: int, fp: Fingerprint) -> tuple[np.ndarray, np.ndarray]:
    """One fingerprint's keys and their entries (ENTRY)."""
    tr = triplets(fp)
    e = np.zeros(len(tr), dtype=ENTRY)
    e["fp"] = fp_id
    e["ms"] = np.round(tr.t1 * 1000)
    e["band"] = np.round(tr.b1 * 64)
    e["span"] = np.round(tr.span * 1000)
    return keys(tr, fp.short), e


def sorted_run(ids: np.ndarray, key_parts: list[np.ndarray], entry_parts: list[np.ndarray]) -> Run:
    """A run of the given keys and entries (ENTRY, of the fingerprints `ids`), sorted by key."""
    k = np.concatenate(key_parts) if key_parts else np.zeros(0, np.uint32)
    e = np.concatenate(entry_parts) if entry_parts else np.zeros(0, ENTRY)
    indexed = e["ms"] <= MAX_INDEXED_MS
    k, e = k[indexed], pack(e[indexed], ids)
    order = np.argsort(k, kind="stable")
    k, e = k[order], e[order]
    if len(k) < DENSE_ENTRIES:
        return Run(ids, k, e)
    offsets = np.zeros((1 << KEY_BITS) + 1, dtype=np.uint64)
    np.cumsum(np.bincount(k, minlength=1 << KEY_BITS), out=offsets[1:])
    return Run(ids, np.zeros(0, np.uint32), e, offsets=offsets)


def merge_runs(runs: list[Run], masked: set[int]) -> Run:
    """One run holding what `runs` hold, less the masked fingerprints (no SQLite read needed)."""
    gone = np.fromiter(masked, np.int64, len(masked))
    ids = np.setdiff1d(np.concatenate([r.ids for r in runs]), gone)
    keys_, entries = [], []
    for r in runs:
        e = r.unpack(np.asarray(r.entries))
        keep = (e["fp"] != 0) & ~np.isin(e["fp"], gone)  # 0: a damaged entry (see unpack)
        keys_.append(r.all_keys()[keep])
        entries.append(e[keep])
    return sorted_run(ids, keys_, entries)


def pack(entries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ENTRY as PACKED, for a run covering `ids` (ascending; every entry's fingerprint among them)."""
    if len(ids) > MAX_RUN_FINGERPRINTS:
        raise ValueError(f"a run holds at most {MAX_RUN_FINGERPRINTS} fingerprints, not {len(ids)}")
    half = TIME_STEP_MS // 2  # to round to the nearest step in integers
    ordinal = _ordinals(ids, entries["fp"]).astype(np.uint64)
    time = (entries["ms"].astype(np.uint64) + half) // TIME_STEP_MS
    band = np.minimum((entries["band"].astype(np.uint64) * BAND_STEPS + 32) // 64, (1 << _BAND_BITS) - 1)
    span = np.minimum((entries["span"].astype(np.uint64) + half) // TIME_STEP_MS, (1 << _SPAN_BITS) - 1)
    packed = ordinal << np.uint64(_SPAN_BITS + _BAND_BITS + _TIME_BITS)
    packed |= time << np.uint64(_SPAN_BITS + _BAND_BITS)
    packed |= band << np.uint64(_SPAN_BITS)
    packed |= span
    return packed


def _ordinals(ids: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Each fingerprint id's place in `ids`: through a table when the ids are about dense (SQLite's
    are). A binary search made packing 2 M entries take 0.43 s; the table, 0.03 s."""
    if len(ids) == 0 or int(ids[-1] - ids[0]) > 4 * len(ids) + 1024:
        return np.searchsorted(ids, fp)
    table = np.zeros(int(ids[-1] - ids[0]) + 1, dtype=np.int64)
    table[ids - ids[0]] = np.arange(len(ids))
    return table[fp.astype(np.int64) - ids[0]]


def unpack(packed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """PACKED entries of a run covering `ids` as ENTRY (in 32-bit halves: a third faster)."""
    low, high = _halves(packed)
    e = np.empty(len(low), ENTRY)
    e["span"] = (low & ((1 << _SPAN_BITS) - 1)) * TIME_STEP_MS
    e["band"] = (((low >> _SPAN_BITS) & ((1 << _BAND_BITS) - 1)) * 128 + BAND_STEPS) // (2 * BAND_STEPS)  # x 64/5
    e["ms"] = _time_ms(low, high)
    ordinal = _ordinal(high)
    inside = ordinal < len(ids)
    if inside.all():
        e["fp"] = ids[ordinal]
    else:  # a damaged entry (doctor checks the body; a load does not): fingerprint 0, which no file has
        e["fp"] = 0
        e["fp"][inside] = ids[ordinal[inside]]
    return e


_LOW_TIME_BITS = 32 - _SPAN_BITS - _BAND_BITS  # of the time's bits, those in the low half


def _halves(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    halves = np.ascontiguousarray(packed, dtype="<u8").view("<u4").reshape(-1, 2)
    return halves[:, 0], halves[:, 1]


def _ordinal(high: np.ndarray) -> np.ndarray:
    return high >> np.uint32(_TIME_BITS - _LOW_TIME_BITS)


def _time_ms(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    high_time = high & np.uint32((1 << (_TIME_BITS - _LOW_TIME_BITS)) - 1)
    return ((low >> np.uint32(_SPAN_BITS + _BAND_BITS)) | (high_time << np.uint32(_LOW_TIME_BITS))) * np.uint32(TIME_STEP_MS)


# -- files -------------------------------------------------------------------------


def save(lookup: PrintLookup, directory: Path) -> None:
    """Write new runs, then the manifest, each atomically; then delete runs no manifest names.

    Call with the index's write lock held: nobody else writes here, so any run
    not named by the new manifest is from an older state or a killed save.
    """
    for run in lookup.runs:
        if run.name is None:
            run.name = f"prints-{uuid.uuid4().hex}.run"
            _write_atomic(directory / run.name, _run_bytes(run))
    manifest = {"version": VERSION, "keys": KEYS_VERSION, "generation": lookup.generation, "runs": [r.name for r in lookup.runs],
                "masked": sorted(lookup.masked)}
    manifest["checksum"] = _manifest_checksum(manifest)
    _write_atomic(directory / MANIFEST, json.dumps(manifest).encode())
    named = {r.name for r in lookup.runs}
    for path in directory.glob(RUN_GLOB):
        if path.name not in named:
            path.unlink(missing_ok=True)
    for path in directory.glob(f".{MANIFEST}.*.tmp"):
        path.unlink(missing_ok=True)
    for path in directory.glob(".prints-*.run.*.tmp"):
        path.unlink(missing_ok=True)


def load(directory: Path, *, verify: bool = False) -> PrintLookup | None:
    """The saved lookup index, None when there is none; LookupCorrupt when a file is damaged.

    Runs are memory-mapped; `verify` also checks each run's checksum (doctor does).
    """
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        names, masked, generation = manifest["runs"], manifest["masked"], int(manifest["generation"])
        if (manifest.get("version"), manifest.get("keys")) != (VERSION, KEYS_VERSION):
            raise LookupOutdated(f"{path} holds keys of another audiosearch version (fingerprint "
                                 f"{manifest.get('version')}, keys {manifest.get('keys')}; this one makes "
                                 f"{VERSION}, {KEYS_VERSION})")
        if manifest.get("checksum") != _manifest_checksum(manifest):  # a changed masked id would (un)hide a file
            raise LookupCorrupt(f"{path} is damaged (checksum mismatch)")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LookupCorrupt(f"{path} is unreadable ({e})") from e
    runs = [_read_run(directory / name, verify) for name in names]
    return PrintLookup(runs, {int(i) for i in masked}, generation)


def _manifest_checksum(manifest: dict) -> int:
    rest = {k: v for k, v in manifest.items() if k != "checksum"}
    return xxhash.xxh64(json.dumps(rest, sort_keys=True).encode()).intdigest()


def _run_bytes(run: Run) -> list[bytes | memoryview]:
    offsets = run.offsets if run.offsets is not None else np.zeros(0, np.uint64)
    body = [run.ids.astype("<i8").tobytes(), run.keys.astype("<u4").tobytes(), run.entries.tobytes(),
            offsets.astype("<u8").tobytes()]
    digest = xxhash.xxh64()
    for part in body:
        digest.update(part)
    return [_HEADER.pack(MAGIC, len(run.ids), len(run.entries), len(offsets), digest.intdigest(),
                         xxhash.xxh64(body[0]).intdigest()), *body]


def _read_run(path: Path, verify: bool) -> Run:
    try:
        with open(path, "rb") as f:
            magic, n_ids, n_entries, n_offsets, checksum, ids_checksum = _HEADER.unpack(f.read(_HEADER.size))
        size = path.stat().st_size
    except (OSError, struct.error) as e:
        raise LookupCorrupt(f"{path} is unreadable ({e})") from e
    if magic != MAGIC and magic.startswith(b"ASPRINT"):
        raise LookupOutdated(f"{path} was written by another audiosearch version ({magic.decode(errors='replace')})")
    n_keys = 0 if n_offsets else n_entries
    sizes = [8 * n_ids, 4 * n_keys, PACKED.itemsize * n_entries, 8 * n_offsets]
    expected = _HEADER.size + sum(sizes)
    if magic != MAGIC or size != expected or n_offsets not in (0, (1 << KEY_BITS) + 1):
        raise LookupCorrupt(f"{path} is damaged (size {size}, expected {expected})")
    if size == _HEADER.size:
        return Run(np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, PACKED), path.name)
    body = np.memmap(path, dtype=np.uint8, mode="r")[_HEADER.size:]
    if verify and xxhash.xxh64(body).intdigest() != checksum:
        raise LookupCorrupt(f"{path} is damaged (checksum mismatch)")
    ends = np.cumsum(sizes)
    ids, k, e, o = (body[a:b] for a, b in zip([0, *ends[:-1]], ends))
    if xxhash.xxh64(ids).intdigest() != ids_checksum:
        raise LookupCorrupt(f"{path} is damaged (its fingerprint ids do not match their checksum)")
    offsets = o.view("<u8") if n_offsets else None
    if offsets is not None and (offsets[-1] != n_entries or (verify and np.any(np.diff(offsets.astype(np.int64)) < 0))):
        raise LookupCorrupt(f"{path} is damaged (bucket table does not match its entries)")
    return Run(np.asarray(ids.view("<i8"), dtype=np.int64), k.view("<u4"), e.view(PACKED), path.name, offsets)


def _write_atomic(path: Path, parts) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts if isinstance(parts, list) else [parts]:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- for benchmarks ----------------------------------------------------------------


def synthetic_index(hours: float, directory: str | Path | None = None, *, seed: int = 0,
                    triplets_per_second: float | None = None) -> PrintLookup:
    """A lookup index of random keys the size of `hours` of audio (for lookup timing only).

    Keys follow the measured density of real fingerprints (`triplets_per_second`)
    but are uniform, so buckets are as full as real ones on average, not in the tail.
    Saved under `directory` (and memory-mapped back) when one is given; a big one is written
    there bucket range by bucket range, so 10,000 hours (13 GB) need disk, not memory.
    """
    rate = triplets_per_second or SYNTHETIC_TRIPLETS_PER_SECOND
    n = int(hours * 3600 * rate)
    rng = np.random.default_rng(seed)
    files = max(1, int(hours * 3600 / 30))  # 30 s files
    ids = np.arange(1, files + 1, dtype=np.int64)
    if directory is not None and n >= DENSE_ENTRIES:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        run = _write_synthetic_run(directory, ids, n, rng)
        save(PrintLookup([run], set(), 0), directory)  # the run is named already: writes the manifest only
        return load(directory)
    k = np.sort(rng.integers(0, 1 << KEY_BITS, n, dtype=np.uint32))
    lookup = PrintLookup([sorted_run(ids, [k], [_random_entries(rng, n, files)])], set(), 0)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save(lookup, Path(directory))
        lookup = load(Path(directory))
    return lookup


def _random_entries(rng: np.random.Generator, n: int, files: int) -> np.ndarray:
    e = np.zeros(n, dtype=ENTRY)
    e["fp"] = rng.integers(1, files + 1, n, dtype=np.uint32)
    e["ms"] = rng.integers(0, 30_000, n, dtype=np.uint32)
    e["band"] = rng.integers(0, 90 * 64, n, dtype=np.uint16)
    e["span"] = rng.integers(60, 1200, n, dtype=np.uint16)
    return e


def _write_synthetic_run(directory: Path, ids: np.ndarray, n: int, rng: np.random.Generator,
                         chunk: int = 1 << 24) -> Run:
    """A dense run of about `n` uniform random entries, streamed to disk in key order."""
    buckets = 1 << KEY_BITS
    offsets = np.zeros(buckets + 1, dtype=np.uint64)
    np.cumsum(rng.poisson(n / buckets, buckets), out=offsets[1:])
    total = int(offsets[-1])
    digest = xxhash.xxh64()
    name = f"prints-{uuid.uuid4().hex}.run"
    tmp = directory / f".{name}.synthetic.tmp"
    with open(tmp, "wb") as f:
        f.write(b"\0" * _HEADER.size)
        # a generator: one chunk of entries in memory at a time
        entries = (pack(_random_entries(rng, min(chunk, total - lo), len(ids)), ids).tobytes()
                   for lo in range(0, total, chunk))
        for part in itertools.chain([ids.astype("<i8").tobytes()], entries, [offsets.astype("<u8").tobytes()]):
            digest.update(part)
            f.write(part)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, len(ids), total, len(offsets), digest.intdigest(),
                             xxhash.xxh64(ids.astype("<i8").tobytes()).intdigest()))
    os.replace(tmp, directory / name)
    return _read_run(directory / name, verify=False)


SYNTHETIC_TRIPLETS_PER_SECOND = 56.0  # what the library fingerprints of music and speech hold, about (benchmark set)
