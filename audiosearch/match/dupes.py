"""The whole-library duplicate report: which files hold the same audio, where, and which copy to keep.

Every file's stored fingerprint (from SQLite: no audio is decoded again) is
matched against the index's own print lookup, itself left out: the lookup
proposes the few files sharing enough aligned triplets, never all pairs.
Each proposed pair is then verified on its own, both ways round (A's
triplets against B's alone, and B's against A's), and the better placement
kept. So a pair's result depends on the two fingerprints only, not on which
side found it or on what else the library holds: that is what lets an
incremental run (only new and changed files matched as queries) give the
same report as a full one. A new file matched against the whole index finds
the old files that contain it, that it contains, and that it overlaps.

Results are kept in SQLite (`dupe_queries`, `dupe_pairs`), keyed by
fingerprint id; a changed file gets a new fingerprint id, a deleted one
leaves, so a run matches only fingerprints it has not matched before.

Pairs are classified by how much of each file the match covers (between
its first and last spectral peak, so leading and trailing silence does not
count): `whole` (all of both), `contained` (all of one), `partial`.
Connected pairs form groups; each group suggests a file to keep.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..audio import file_format
from ..collection import Collection
from .fingerprint import FAR, KEYS_VERSION, NEAR, QUERY_WIDEN, SHORT_KEY, VERSION, Fingerprint, triplets
from .lookup import Keep, PrintLookup, entries_of, sorted_run
from .matcher import SHORT_BIN, collisions, least_inliers, match_fingerprint, query_bins, score_bin
from .verify import MIN_SCORE, Alignment, align

KINDS = ("whole", "contained", "partial")
MIN_COVERED_SECONDS = 6  # seconds of a long file in which aligned triplets start: fewer can be chance (a few
# notes of one tune recurring transposed in another; measured on generated music, benchmarks/dupes.py)
# Discovery proposes pairs for match_pair to verify with every key, so it asks for less: aligned
# collisions starting in 3 seconds, a fifth of those inside the aligned range (see dense_enough).
DISCOVER_COVERED_SECONDS, DISCOVER_SHARE = 3, 0.2
DISCOVER_INLIERS = 10  # collisions (through rare keys) a file needs before the lookup's answer is verified
# One key in 4 is probed (RareKeys): at 1,000 h (generated library, benchmarks/dupes.py) 11x less CPU a
# file at the same recall of planted pairs; one in 8 lost excerpts and partial overlaps.
DISCOVER_SAMPLE = 4
DISCOVER_BUCKET = 32  # see RareKeys: the smallest bucket cap, for libraries under ~10,000 files
# The pre-filter's table (verify.plausible) for discovery: a library of similar music gives a file
# ~1 M collisions at 1,000 h, many at consistent lags; 4 M cells let through fewer of them than 1 M
# (at 1,000 h: 1 M cells 2x, 256 k cells 3x the CPU a file). A query clip's collisions are chance ones: 1 M is best.
DISCOVER_TABLE_BITS = 22
FILES_PER_BUCKET_ENTRY = 300  # above that the cap grows with the library (files / 300): buckets fill as it grows
EDGE_SECONDS, EDGE_SHARE = 1.0, 0.05  # a match this close to a file's first and last peak covers all of it
WINDOW_SECONDS, WINDOW_STEP = 20.0, 12.0  # a long file is proposed pairs window by window (see `candidates`)
BATCH = 64  # fingerprints matched per SQLite commit: an interrupted run keeps what it finished
# What the stored pairs depend on; when it changes, every pair is found again.
PARAMS = json.dumps({"dupes": 1, "fingerprint": VERSION, "keys": KEYS_VERSION, "min_score": MIN_SCORE,
                     "covered": MIN_COVERED_SECONDS,
                     "discover": [DISCOVER_INLIERS, DISCOVER_BUCKET, FILES_PER_BUCKET_ENTRY, DISCOVER_SAMPLE,
                                  DISCOVER_COVERED_SECONDS, DISCOVER_SHARE],
                     "edge": [EDGE_SECONDS, EDGE_SHARE], "near": NEAR, "far": FAR,
                     "window": [WINDOW_SECONDS, WINDOW_STEP]})
PARAMS_KEY = "dupes_params"

LOSSY_FORMATS = {"MP3", "OGG", "AAC", "M4A", "M4B", "MP4", "M4V", "MOV", "3GP", "WMA", "ASF", "WEBM", "MKA", "MKV",
                 "AC3", "AMR", "OPUS"}
LOSSY_SUBTYPES = {"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS", "GSM610", "G721_32",
                  "G723_24", "G723_40", "IMA_ADPCM", "MS_ADPCM", "VOX_ADPCM", "NMS_ADPCM_16", "NMS_ADPCM_24",
                  "NMS_ADPCM_32", "ULAW", "ALAW"}
BIT_DEPTHS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64,
              "ALAC_16": 16, "ALAC_20": 20, "ALAC_24": 24, "ALAC_32": 32, "DPCM_8": 8, "DPCM_16": 16, "DWVW_12": 12,
              "DWVW_16": 16, "DWVW_24": 24}


# -- the pairwise results ---------------------------------------------------------------------


@dataclass(frozen=True)
class PairRow:
    """One verified pair as stored: fingerprint a < b; a's range and b's, `speed` a seconds per b second,
    `pitch` b frequency over a frequency (b plays as a query would against library file a)."""

    fp_a: int
    fp_b: int
    kind: str
    inner: int | None  # contained: the fingerprint wholly inside the other
    a_start: float
    a_end: float
    b_start: float
    b_end: float
    speed: float
    pitch: float
    score: float
    inliers: int

    @property
    def seconds(self) -> float:
        """The shared passage, in the shorter of its two durations."""
        return min(self.a_end - self.a_start, self.b_end - self.b_start)


def match_pair(a_id: int, a: Fingerprint, b_id: int, b: Fingerprint) -> PairRow | None:
    """Whether two fingerprints hold the same audio, and where: each matched against the other alone,
    the placement covering more kept. Symmetric: match_pair(b, a) is the same pair."""
    if a_id > b_id:
        a_id, a, b_id, b = b_id, b, a_id, a
    ways = [(w, flip) for w, flip in ((_one_way(b, a_id, a), False), (_one_way(a, b_id, b), True)) if w is not None]
    if not ways:
        return None
    al, flip = max(ways, key=lambda w: (round(min(w[0].query_end - w[0].query_start, w[0].end - w[0].start), 2),
                                         w[0].inliers, w[1]))
    if not flip:  # b was the query, a the library file
        a_range, b_range, speed, pitch = (al.start, al.end), (al.query_start, al.query_end), al.speed, al.pitch
    else:
        a_range, b_range, speed, pitch = (al.query_start, al.query_end), (al.start, al.end), 1 / al.speed, 1 / al.pitch
    a_range, b_range = _clip(a_range, a), _clip(b_range, b)
    a_all, b_all = _covers(a, *a_range), _covers(b, *b_range)
    kind = "whole" if a_all and b_all else "contained" if a_all or b_all else "partial"
    inner = (a_id if a_all else b_id) if kind == "contained" else None
    return PairRow(a_id, b_id, kind, inner, *a_range, *b_range, float(speed), float(pitch), float(al.score),
                   int(al.inliers))


def _one_way(query: Fingerprint, lib_id: int, lib: Fingerprint) -> Alignment | None:
    """The query's best verified placement in one library fingerprint, if any."""
    found = [a for a in match_fingerprint(_single_lookup(lib_id, lib), query, near=NEAR, far=FAR, min_score=0.0)
             if dense_enough(a, query)]
    return found[0] if found else None


def _single_lookup(fp_id: int, fp: Fingerprint) -> PrintLookup:
    """A lookup index holding one fingerprint, built in memory."""
    keys, entries = entries_of(fp_id, fp)
    return PrintLookup([sorted_run(np.array([fp_id], dtype=np.int64), [keys], [entries])])


def dense_enough(a: Alignment, query: Fingerprint, covered_seconds: int = MIN_COVERED_SECONDS,
                 share: float = MIN_SCORE) -> bool:
    """Whether an alignment is a shared passage rather than chance: aligned triplets start in `share` of
    the query's seconds inside the matched range, and in `covered_seconds` of them at least (by default
    match_pair's rule; discovery asks for less, see DISCOVER_SHARE).

    The matcher's own score is the share of the *whole* query: right for a clip, wrong for a file that
    shares one minute of its hour. A clip under 2 s keeps the matcher's rule (50 ms bins, whole clip).
    """
    if query.short:
        return a.score >= MIN_SCORE
    bins = np.unique(np.floor(query.times).astype(np.int64))
    covered = round(a.score * len(bins))
    inside = int(np.count_nonzero((bins >= np.floor(a.query_start)) & (bins <= np.floor(a.query_end))))
    return covered >= covered_seconds and covered >= share * max(1, inside)


def _clip(rng: tuple[float, float], fp: Fingerprint) -> tuple[float, float]:
    return max(0.0, float(rng[0])), min(float(rng[1]), fp.duration) if fp.duration else float(rng[1])


def _covers(fp: Fingerprint, start: float, end: float) -> bool:
    """Whether [start, end] spans the file from its first peak to its last (its audible extent)."""
    if len(fp) == 0:
        return False
    first, last = float(fp.times[0]), float(fp.times[-1])
    edge = max(EDGE_SECONDS if not fp.short else SHORT_BIN * 4, EDGE_SHARE * (last - first))
    return start - first <= edge and last - end <= edge


class RareKeys:
    """A lookup index probed only for rare keys (`max_bucket` entries or fewer), and one in `sample` of them.

    Whole-library matching asks the lookup about every stored triplet; common keys (a
    harmonic interval on a tempered scale, a repeated drum pattern) return thousands of
    entries from files that merely sound alike, and the cost of verifying them grows with
    the library squared. A shared passage of a few seconds holds enough rare keys to be
    proposed; `match_pair` then verifies it with all of them.

    The sample is of key values (a hash of the key), not of triplets, so both copies of a
    shared passage keep the same keys: its aligned collisions fall by `sample`, like the
    chance ones, and a passage of MIN_COVERED_SECONDS still holds dozens of them.
    """

    def __init__(self, lookup: PrintLookup, max_bucket: int, sample: int = 1):
        self.inner, self.max_bucket, self.sample = lookup, max_bucket, sample

    def lookup(self, probe_keys: np.ndarray, keep: Keep | None = None) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.nonzero(sampled_keys(probe_keys, self.sample))[0]
        if keep is not None:
            outer = keep
            keep = lambda probe, ordinal, ms: outer(np.take(chosen, probe), ordinal, ms)  # noqa: E731
        probe, entries = self.inner.lookup(np.take(probe_keys, chosen), keep, max_held=self.max_bucket)
        return np.take(chosen, probe), entries


def sampled_keys(keys: np.ndarray, sample: int) -> np.ndarray:
    """Which keys are in the 1-in-`sample` subset (a power of two) that discovery probes; every key of
    a sub-2-second print is (SHORT_KEY): a click holds too few triplets to be sampled."""
    keys = np.asarray(keys, dtype=np.uint32)
    if sample <= 1:
        return np.ones(len(keys), dtype=bool)
    mixed = keys * np.uint32(0x9E3779B1)  # wraps: the high bits mix all of the key's
    return ((mixed >> np.uint32(32 - (sample.bit_length() - 1))) == 0) | ((keys & np.uint32(SHORT_KEY)) != 0)


def candidates(lookup: PrintLookup | RareKeys, fp_id: int, fp: Fingerprint) -> list[int]:
    """Fingerprints the lookup finds sharing a passage with this one (itself left out).

    A long file is aligned window by window: the lookup verifies the few files with the most
    collisions, and over a whole long file those are files that merely share common keys, not a
    short excerpt of it that shares one passage. Windows overlap by more than MIN_COVERED_SECONDS,
    so any passage long enough to count lies wholly in one. The lookup itself is asked once, for
    the whole file: its pre-filter keeps every file a window could align (a window's collisions
    are some of the file's), and each window aligns the kept collisions its anchors start.
    """
    tr = triplets(fp, NEAR, FAR, QUERY_WIDEN)
    if len(tr) == 0:
        return []
    least = least_inliers(fp, DISCOVER_INLIERS)
    rows, entries = collisions(lookup, tr, fp.short, least, DISCOVER_TABLE_BITS)
    anchors = tr.t1[rows]
    found: set[int] = set()
    for start, end, part in _windows(fp):
        sel = np.nonzero((anchors >= start) & (anchors < end))[0]
        for a in align(tr, query_bins(part), rows[sel], entries[sel], min_inliers=least, min_score=0.0,
                       bin_seconds=score_bin(fp)):
            if a.fp_id != fp_id and dense_enough(a, part, DISCOVER_COVERED_SECONDS, DISCOVER_SHARE):
                found.add(a.fp_id)
    return sorted(found)


def _windows(fp: Fingerprint) -> list[tuple[float, float, Fingerprint]]:
    """(start, end, the peaks between) of each window of a long file; a short one is one window."""
    if fp.short or fp.duration <= WINDOW_SECONDS * 1.5:
        return [(-np.inf, np.inf, fp)]
    out = []
    for start in np.arange(0.0, max(fp.duration - WINDOW_SECONDS, 0.0) + WINDOW_STEP, WINDOW_STEP):
        sel = (fp.times >= start) & (fp.times < start + WINDOW_SECONDS)
        if np.count_nonzero(sel) >= 3:
            out.append((float(start), float(start + WINDOW_SECONDS),
                        Fingerprint(fp.times[sel], fp.bands[sel], fp.strengths[sel], fp.duration, False)))
    return out


@dataclass
class UpdateStats:
    """What one run matched: `matched` fingerprints as queries, `reused` from earlier runs, `forgotten` gone."""

    fingerprints: int = 0
    matched: int = 0
    reused: int = 0
    forgotten: int = 0
    pairs: int = 0
    seconds: float = 0.0
    saved: bool = True  # False on a read-only index: everything was matched in memory


Progress = Callable[[int, int], None]  # (fingerprints matched so far, to match)


def update_pairs(collection: Collection, *, progress: Progress | None = None, full: bool = False,
                 workers: int | None = None) -> tuple[list[PairRow], UpdateStats]:
    """Bring the stored pairwise results up to the index's fingerprints, and return them all.

    Only fingerprints not matched before are matched (all of them with `full`, or when the matching
    parameters changed); those of deleted or changed files are forgotten first. `workers`: processes
    matching (default: one per CPU, when there are enough files to pay for starting them).
    """
    started = time.perf_counter()
    store = collection.store
    if not store.has_dupes and not store.read_only:
        store.upgrade()
    persist = store.has_dupes and not store.read_only
    lookup = collection.load_prints()
    with store.snapshot():
        live = {i for i, v in store.live_prints().items() if v == VERSION}
        stale = not persist or full or store.get_meta().get(PARAMS_KEY) != PARAMS
        done = set() if stale else store.dupe_queries()
    stats = UpdateStats(fingerprints=len(live), saved=persist)
    memory: dict[tuple[int, int], PairRow] = {}
    if persist:
        with store.transaction(bump=False):
            if stale:
                store.forget_dupes()
                store.set_meta({PARAMS_KEY: PARAMS})
            gone = done - live
            store.forget_dupes(gone)
        stats.forgotten = len(gone)
    todo = sorted(live - done)
    stats.reused = len(live) - len(todo)
    for batch, rows in _matched(collection, lookup, todo, live, workers):
        if persist:
            with store.transaction(bump=False):
                store.save_dupes(batch, [tuple(asdict(r).values()) for r in rows])
        else:
            memory.update(((r.fp_a, r.fp_b), r) for r in rows)
        stats.matched += len(batch)
        if progress is not None:
            progress(stats.matched, len(todo))
    if persist:
        with store.snapshot():
            pairs = [PairRow(*row) for row in store.dupe_pairs()]
    else:
        pairs = sorted(memory.values(), key=lambda r: (r.fp_a, r.fp_b))
    pairs = [p for p in pairs if p.fp_a in live and p.fp_b in live]
    stats.pairs = len(pairs)
    stats.seconds = time.perf_counter() - started
    return pairs, stats


PARALLEL_MIN = 400  # files to match before worker processes pay for their start (~1 s each)


def _matched(collection: Collection, lookup: PrintLookup, todo: list[int], live: set[int],
             workers: int | None) -> Iterator[tuple[list[int], list[PairRow]]]:
    """(batch of fingerprint ids, their pairs), in order, matched here or by worker processes."""
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(todo) < PARALLEL_MIN:
        match = _BatchMatcher(collection.store, lookup, live)
        for batch in batches:
            yield batch, match(batch)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                               initargs=(str(collection.dir), sorted(live), os.getpid()))
    try:
        yield from zip(batches, pool.map(_work, batches))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def discovery_bucket(files: int) -> int:
    """The largest bucket probed when proposing pairs in a library of `files` fingerprints.

    A fixed cap keeps the cost per file flat but loses recall as buckets fill (generated
    library of 100,000 files, one key in 4 probed: cap 32 found 0.45 of the planted pairs,
    cap 100 0.94, cap 250 and more all of them; benchmarks/dupes.py and BENCHMARKS.md), so the
    cap grows with the library, at the price of a cost per file that grows too.
    """
    return max(DISCOVER_BUCKET, files // FILES_PER_BUCKET_ENTRY)


class _BatchMatcher:
    """Matches fingerprints (by id) against the lookup, then each proposed pair on its own."""

    def __init__(self, store, lookup: PrintLookup, live: set[int]):
        self.rare = RareKeys(lookup, discovery_bucket(len(live)), DISCOVER_SAMPLE)
        self.live, self.cache = live, _PrintCache(store)

    def __call__(self, batch: list[int]) -> list[PairRow]:
        return [row for fp_id in batch for row in self.pairs_of(fp_id)]

    def pairs_of(self, fp_id: int) -> list[PairRow]:
        fp = self.cache.get([fp_id]).get(fp_id)
        if fp is None:
            return []
        found = [c for c in candidates(self.rare, fp_id, fp) if c in self.live]
        others = self.cache.get(found)
        return [row for c in found if c in others and (row := match_pair(fp_id, fp, c, others[c])) is not None]


_worker: _BatchMatcher | None = None


def _start_worker(index_dir: str, live: list[int], parent: int) -> None:
    from ..decode_pool import _die_with_parent

    global _worker
    _die_with_parent(parent)
    collection = Collection(index_dir)
    _worker = _BatchMatcher(collection.store, collection.load_prints(), set(live))


def _work(batch: list[int]) -> list[PairRow]:
    return _worker(batch)


class _PrintCache:
    """Fingerprints read from SQLite, the most recent few kept (a file's candidates recur)."""

    def __init__(self, store, size: int = 4096):
        self.store, self.size, self.prints = store, size, {}

    def get(self, ids: Iterable[int]) -> dict[int, Fingerprint]:
        ids = list(ids)
        missing = [i for i in ids if i not in self.prints]
        if missing:
            for fp_id, data in self.store.print_data(missing).items():
                self.prints[fp_id] = Fingerprint.from_bytes(data)
            while len(self.prints) > self.size:
                self.prints.pop(next(iter(self.prints)))
        return {i: self.prints[i] for i in ids if i in self.prints}


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DupeFile:
    """A file of a duplicate group, with what picks the one to keep."""

    file_id: int
    path: str
    duration: float | None
    sample_rate: int | None
    channels: int | None
    format: str | None
    subtype: str | None

    @property
    def lossless(self) -> bool:
        return bool(self.format) and self.format.upper() not in LOSSY_FORMATS and (self.subtype or "") not in LOSSY_SUBTYPES

    @property
    def bit_depth(self) -> int | None:
        return BIT_DEPTHS.get(self.subtype or "")

    def rank(self) -> tuple:
        """Sort key, best first: lossless, higher rate, more bits, longer (to 0.1 s), then path."""
        return (not self.lossless, -(self.sample_rate or 0), -(self.bit_depth or 0), -round(self.duration or 0, 1),
                self.path)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(lossless=self.lossless, bit_depth=self.bit_depth)
        return d


@dataclass(frozen=True)
class DupePair:
    """Two files holding the same audio: `a` the better to keep of the two. Ranges are in each file's
    own seconds; `speed` is a's seconds per b's second (1.05: b plays 5 % faster), `pitch` b's frequency
    over a's (1.122: b is two semitones up), as `query` reports a clip against a library file."""

    kind: str
    a: DupeFile
    b: DupeFile
    a_start: float
    a_end: float
    b_start: float
    b_end: float
    speed: float
    pitch: float
    score: float
    inliers: int
    inner: str | None = None  # contained: "a" or "b", the file wholly inside the other

    @property
    def seconds(self) -> float:
        return min(self.a_end - self.a_start, self.b_end - self.b_start)

    def to_dict(self) -> dict:
        r = lambda v: round(v, 4)  # noqa: E731
        return {"kind": self.kind, "a": self.a.path, "b": self.b.path, "inner": self.inner,
                "a_start": r(self.a_start), "a_end": r(self.a_end), "b_start": r(self.b_start), "b_end": r(self.b_end),
                "seconds": r(self.seconds), "speed": r(self.speed), "pitch": r(self.pitch), "score": r(self.score),
                "inliers": self.inliers}


@dataclass(frozen=True)
class SimilarPair:
    """Two files with segments this close by embedding, not verified as the same recording."""

    a: DupeFile
    b: DupeFile
    a_start: float
    a_end: float
    b_start: float
    b_end: float
    cosine: float
    kind: str = "similar"

    def to_dict(self) -> dict:
        r = lambda v: round(v, 4)  # noqa: E731
        return {"kind": self.kind, "a": self.a.path, "b": self.b.path, "a_start": r(self.a_start),
                "a_end": r(self.a_end), "b_start": r(self.b_start), "b_end": r(self.b_end), "cosine": r(self.cosine)}


@dataclass
class DupeGroup:
    """Files connected by verified pairs; `files[0]` is the one to keep, for `reason`."""

    number: int
    files: list[DupeFile]
    reason: str
    pairs: list[DupePair]

    @property
    def keeper(self) -> DupeFile:
        return self.files[0]

    def to_dict(self) -> dict:
        return {"group": self.number, "keep": self.keeper.path, "reason": self.reason,
                "files": [f.to_dict() for f in self.files], "pairs": [p.to_dict() for p in self.pairs]}


@dataclass
class DupesReport:
    groups: list[DupeGroup]
    similar: list[SimilarPair] = field(default_factory=list)
    stats: UpdateStats = field(default_factory=UpdateStats)
    similar_cosine: float | None = None

    def to_dict(self) -> dict:
        out = {"groups": [g.to_dict() for g in self.groups], "stats": asdict(self.stats)}
        if self.similar_cosine is not None:
            out["similar"] = [s.to_dict() for s in self.similar]
            out["similar_cosine"] = self.similar_cosine
        return out


def find_dupes(index_dir: str | Path, *, min_seconds: float = 0.0, kinds: Iterable[str] | None = None,
               labels: list[str] | None = None, similar: float | None = None, full: bool = False,
               workers: int | None = None, progress: Progress | None = None) -> DupesReport:
    """Groups of files in an index that hold the same audio (see the module's docstring).

    `min_seconds`: the shortest shared passage reported; `kinds`: of KINDS; `labels`: only files with a
    segment carrying one of these labels; `similar`: also pairs of files whose segment embeddings are
    at least this cosine apart but that were not verified; `full`: match every file again; `workers`:
    processes matching (see `update_pairs`).

    Example::

        from audiosearch.match.dupes import find_dupes
        for group in find_dupes("indexes/default", kinds=["whole"]).groups:
            print(group.keeper.path, group.reason, [p.b.path for p in group.pairs])
    """
    from ..query import resolve_label

    kinds = set(kinds or KINDS)
    if unknown := kinds - set(KINDS):
        raise ValueError(f"unknown kind {sorted(unknown)[0]!r}; kinds: {', '.join(KINDS)}")
    collection = Collection(index_dir)
    try:
        store = collection.store
        allowed = None
        if labels:
            known = store.label_names()
            by_name = {name: i for i, name in known.items()}
            allowed = store.files_with_labels(by_name[resolve_label(n, sorted(known.values()))] for n in labels)
        rows, stats = update_pairs(collection, progress=progress, full=full, workers=workers)
        files = _files(store, {i for r in rows for i in (r.fp_a, r.fp_b)})
        verified = {frozenset((files[r.fp_a].file_id, files[r.fp_b].file_id)) for r in rows}
        rows = [r for r in rows if r.kind in kinds and r.seconds >= min_seconds
                and (allowed is None or (files[r.fp_a].file_id in allowed and files[r.fp_b].file_id in allowed))]
        report = DupesReport(_groups(rows, files), stats=stats, similar_cosine=similar)
        if similar is not None:
            report.similar = similar_pairs(collection, similar, exclude=verified, allowed=allowed)
        return report
    finally:
        collection.close()


def _files(store, fp_ids: set[int]) -> dict[int, DupeFile]:
    """fingerprint id -> its file; format and subtype read from the header for files ingested before they
    were recorded."""
    out = {}
    for fp_id, d in store.print_file_details(fp_ids).items():
        if d["format"] is None:
            d["format"], d["subtype"] = file_format(d["path"])
        out[fp_id] = DupeFile(**d)
    return out


def _groups(rows: list[PairRow], files: dict[int, DupeFile]) -> list[DupeGroup]:
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in rows:
        parent[root(r.fp_a)] = root(r.fp_b)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    groups = []
    for ids in members.values():
        ranked = sorted((files[i] for i in ids), key=DupeFile.rank)
        order = {f.file_id: n for n, f in enumerate(ranked)}
        id_set = set(ids)
        pairs = [_oriented(r, files, order) for r in rows if r.fp_a in id_set]
        pairs.sort(key=lambda p: (order[p.a.file_id], order[p.b.file_id]))
        groups.append(DupeGroup(0, ranked, keep_reason(ranked[0], ranked[1]), pairs))
    groups.sort(key=lambda g: (-len(g.files), g.keeper.path))
    for n, g in enumerate(groups, start=1):
        g.number = n
    return groups


def _oriented(r: PairRow, files: dict[int, DupeFile], order: dict[int, int]) -> DupePair:
    """A stored pair with the better file to keep as `a`."""
    a, b = files[r.fp_a], files[r.fp_b]
    inner = None if r.inner is None else "a" if r.inner == r.fp_a else "b"
    if order[a.file_id] <= order[b.file_id]:
        return DupePair(r.kind, a, b, r.a_start, r.a_end, r.b_start, r.b_end, r.speed, r.pitch, r.score, r.inliers,
                        inner)
    flipped = None if inner is None else "b" if inner == "a" else "a"
    return DupePair(r.kind, b, a, r.b_start, r.b_end, r.a_start, r.a_end, 1 / r.speed, 1 / r.pitch, r.score,
                    r.inliers, flipped)


def keep_reason(best: DupeFile, other: DupeFile) -> str:
    """Why `best` ranks above `other`: the first of the keeper rules that tells them apart."""
    if best.lossless != other.lossless:
        return f"lossless ({best.format}) over lossy ({other.format or 'unknown format'})"
    if (best.sample_rate or 0) != (other.sample_rate or 0):
        return f"higher sample rate ({best.sample_rate} vs {other.sample_rate} Hz)"
    if (best.bit_depth or 0) != (other.bit_depth or 0):
        return f"more bits per sample ({best.bit_depth} vs {other.bit_depth or 'unknown'})"
    if round(best.duration or 0, 1) != round(other.duration or 0, 1):
        return f"longer ({best.duration:.1f} vs {other.duration:.1f} s)"
    return "same quality and length: first by path"


# -- near-duplicates by embedding ----------------------------------------------------------------

SIMILAR_K = 16  # neighbours asked per segment; pairs of files beyond them are not seen
SIMILAR_BATCH = 2048


def similar_pairs(collection: Collection, cosine: float, *, exclude: set[frozenset] = frozenset(),
                  allowed: set[int] | None = None) -> list[SimilarPair]:
    """Pairs of files with a segment each at least `cosine` apart (k-NN over the FAISS index), best
    first; pairs in `exclude` (frozensets of file ids: the verified duplicates) left out."""
    from ..search import search

    store = collection.store
    index, _ = collection.load_index()
    if index.ntotal == 0:
        return []
    best: dict[tuple[int, int], tuple[float, int, int]] = {}
    with store.snapshot():
        for ids, vectors in store.iter_vectors(SIMILAR_BATCH):
            scores, hits, _ = search(index, vectors, min(SIMILAR_K, index.ntotal))
            rows, cols = np.nonzero((scores >= cosine) & (hits >= 0) & (hits != ids[:, None]))
            if len(rows) == 0:
                continue
            info = store.segment_info(set(ids[rows].tolist()) | set(hits[rows, cols].tolist()))
            for q, h, s in zip(ids[rows].tolist(), hits[rows, cols].tolist(), scores[rows, cols].tolist()):
                if q not in info or h not in info:
                    continue
                fq, fh = info[q][0], info[h][0]
                if fq == fh or frozenset((fq, fh)) in exclude:
                    continue
                if allowed is not None and not (fq in allowed and fh in allowed):
                    continue
                key, seg = ((fq, fh), (q, h)) if fq < fh else ((fh, fq), (h, q))
                if key not in best or s > best[key][0]:
                    best[key] = (s, *seg)
        segs = store.segment_info({i for _, a, b in best.values() for i in (a, b)})
        details = _file_details(store, {f for k in best for f in k})
    out = []
    for (fa, fb), (s, sa, sb) in best.items():
        a, b = details[fa], details[fb]
        if DupeFile.rank(b) < DupeFile.rank(a):
            a, b, sa, sb = b, a, sb, sa
        out.append(SimilarPair(a, b, segs[sa][2], segs[sa][3], segs[sb][2], segs[sb][3], float(s)))
    out.sort(key=lambda p: (-p.cosine, p.a.path, p.b.path))
    return out


def _file_details(store, file_ids: set[int]) -> dict[int, DupeFile]:
    out = {}
    for file_id, d in store.file_details(file_ids).items():
        if d["format"] is None:
            d["format"], d["subtype"] = file_format(d["path"])
        out[file_id] = DupeFile(file_id=file_id, **d)
    return out
