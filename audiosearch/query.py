"""`audiosearch query`: embed a clip, predict its labels, and find what sounds like it.

By default results are filtered by the clip's top predicted label and ranked
per file by the file's best segment; the search itself (exact or IVF, with or
without a label selector) is planned in `search.py`.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .audio import Audio, decode
from .collection import Collection
from .errors import AudioDecodeError, AudiosearchError, EmptyIndex, UnknownLabel
from .match.matcher import Match, Matcher
from .model_ref import DEFAULT_MODEL, check_model_available
from .search import Plan, search
from .store import TOP_LABELS

if TYPE_CHECKING:
    from .model import Model


@dataclass
class Hit:
    """One result: a file and its best-matching segment, or, for a verified duplicate, the matched range.

    `match` is the verified match (a `match.Match`: ranges, speed, pitch, score) when the
    clip is the same recording as (part of) this file; None when it only sounds alike.
    """

    rank: int
    similarity: float
    path: str
    start: float
    end: float
    labels: list[tuple[str, float]]
    segment_id: int
    file_id: int = 0
    match: Match | None = None

    @property
    def kind(self) -> str:
        return "duplicate" if self.match is not None else "similar"

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "similarity": round(self.similarity, 6), "path": self.path,
            "start": round(self.start, 3), "end": round(self.end, 3),
            "labels": [{"label": name, "score": round(score, 4)} for name, score in self.labels],
            "segment_id": self.segment_id, "file_id": self.file_id,
            "match": self.match.to_dict() if self.match is not None else {"kind": "similar"},
        }


FORMAT_VERSION = 1  # of QueryResult.to_dict(), the `query --json` object (README: "query --json")


@dataclass
class QueryResult:
    hits: list[Hit]
    query_labels: list[tuple[str, float]]  # the clip's own top predictions
    filter_labels: list[str]  # empty when unfiltered
    matching: int | None  # segments carrying a filter label
    duplicates: int = 0  # leading hits that are verified duplicates
    plans: list[Plan] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    clip: str = ""
    filter_source: str | None = None  # "top label" (the default), "--label", or None when unfiltered
    searched: int = 0  # segments the search ran over: `matching`, or the whole index unfiltered
    query_segments: int = 0

    def to_dict(self) -> dict:
        """The `query --json` object; each hit is a dict that later fields (such as `match`) may extend."""
        return {
            "format_version": FORMAT_VERSION,
            "clip": self.clip,
            "query_segments": self.query_segments,
            "query_labels": [{"label": name, "score": round(score, 4)} for name, score in self.query_labels],
            "filter": {"labels": self.filter_labels, "source": self.filter_source} if self.filter_labels else None,
            "matching_segments": self.searched,
            "duplicates": self.duplicates,
            "hits": [hit.to_dict() for hit in self.hits],
        }


def query(clip: str | Path, *, index_dir: str | Path, **options) -> QueryResult:
    """The k library items nearest to `clip`, filtered by label (see module doc and `query_clips`)."""
    return next(iter(query_clips([clip], index_dir=index_dir, **options)))


def query_clips(
    clips: list[str | Path],
    *,
    index_dir: str | Path,
    k: int = 10,
    labels: list[str] | None = None,
    filter: bool = True,
    per_file: bool = True,
    model: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    kinds: str = "all",
    min_match_seconds: float = 0.0,
    progress: QueryProgress | None = None,
) -> Iterator[QueryResult]:
    """One QueryResult per clip, in order, with one model load for them all (see `Searcher.query`).

    `progress.update(clip, done, total)` follows each clip's segments through the model (a
    2-hour clip is 700 of them).

    Everything that can be checked without the model is checked first (the
    clips exist and are files, the index exists and holds segments, `labels`
    are names the index knows), so a mistake is reported before the model loads.
    """
    check_options(kinds, labels, filter)
    for clip in clips:
        check_clip(clip)
    with Searcher(index_dir, model=model, device=device, precision=precision,
                  fingerprints=kinds != "similar") as searcher:
        searcher.resolve_labels(labels)
        searcher.load()
        for n, clip in enumerate(clips):
            result = searcher.query(clip, k=k, labels=labels, filter=filter, per_file=per_file, kinds=kinds,
                                    min_match_seconds=min_match_seconds, progress=progress)
            if n == 0:  # the first clip's --explain shows what opening the index cost
                result.timings = {**searcher.load_timings, **result.timings}
            yield result


def check_options(kinds: str, labels: list[str] | None, filter: bool) -> None:
    if kinds not in KINDS:
        raise AudiosearchError(f"unknown kind of result {kinds!r}; use one of {', '.join(KINDS)}")
    if labels and not filter:
        raise AudiosearchError("--label and --no-filter contradict each other; pass one or the other")


class Searcher:
    """One index and its model, opened once, queried many times: `query_clips` and `audiosearch serve`.

    Opening is cheap and checks the index (it exists and holds segments); `load()` then loads the
    model, the FAISS index and the fingerprint lookup, once (the first `query` does it if needed).
    Each query first looks at the store's generation: what an ingest committed since is searched
    too, so a long-running server never answers from a stale index. One thread at a time: the
    model and the SQLite connection are not shared across concurrent calls (the server runs every
    search on one worker thread).

    Example::

        with Searcher("indexes/sfx") as s:
            for clip in ("door.wav", "steps.wav"):
                print(s.query(clip, k=5).hits[0].path)
    """

    def __init__(self, index_dir: str | Path, *, model: str | None = None, device: str = "auto",
                 precision: str = "auto", fingerprints: bool = True):
        self.collection = Collection(index_dir)
        try:
            self.labels = _validate_index(self.collection)
        except BaseException:
            self.collection.close()
            raise
        self.model_name = model or self.collection.model_name or DEFAULT_MODEL
        self.device, self.precision, self.fingerprints = device, precision, fingerprints
        self.net: Model | None = None
        self.index = None
        self.matcher: Matcher | None = None
        self.load_timings: dict[str, float] = {}

    def close(self) -> None:
        self.collection.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve_labels(self, labels: list[str] | None) -> list[str]:
        """The names as the index spells them (case-insensitive), or UnknownLabel with suggestions."""
        return [resolve_label(name, self.labels) for name in labels or []]

    def load(self) -> None:
        """Load the model, the FAISS index and the fingerprint lookup, unless loaded already."""
        if self.net is not None:
            return
        watch = _Stopwatch()
        check_model_available(self.model_name)
        from .model import Model  # torch: imported once everything cheap has been checked

        net = Model(self.model_name, device=self.device, precision=self.precision, auto_int8=True)
        self.collection.check_model(net)
        watch.lap("load model")
        self._load_derived()
        watch.lap("load index")
        self.net, self.load_timings = net, watch.laps

    def _load_derived(self) -> None:
        self.index, _ = self.collection.load_index()
        if self.fingerprints:
            self.matcher = Matcher(self.collection, self.collection.load_prints())

    def query(self, clip: str | Path | Audio, *, k: int = 10, labels: list[str] | None = None, filter: bool = True,
              per_file: bool = True, kinds: str = "all", min_match_seconds: float = 0.0,
              name: str | None = None, progress: QueryProgress | None = None) -> QueryResult:
        """The k library items nearest to `clip` (a path, or decoded `Audio` named `name`).

        Verified duplicates come first, then similar items filtered by label. The label filter
        applies to similar items only: an edit can change what the model predicts, and a verified
        duplicate is the same recording whatever its label. `kinds` is "all", "duplicates" (only
        verified duplicates) or "similar" (only the embedding search); `min_match_seconds` drops
        duplicates matching less of the clip than that.
        """
        check_options(kinds, labels, filter)
        names = self.resolve_labels(labels)
        self.load()
        if self.index.generation != self.collection.store.generation:  # an ingest committed since
            self._load_derived()
        audio = clip if isinstance(clip, Audio) else _decode_clip(clip)
        if len(audio.samples) == 0:
            raise AudioDecodeError(f"{name or clip} holds no audio samples")
        matcher = self.matcher if kinds != "similar" else None
        return _query_one(self.collection, self.index, self.net, matcher, audio, name or str(clip), names,
                          filter=filter, k=k, per_file=per_file, kinds=kinds, min_match_seconds=min_match_seconds,
                          watch=_Stopwatch(), progress=progress)


KINDS = ("all", "duplicates", "similar")


class QueryProgress(Protocol):
    def update(self, clip: str, done: int, total: int) -> None: ...


def check_clip(clip: str | Path) -> None:
    """A clip must be a readable, non-empty file: a folder or a broken link is named as such."""
    path = Path(clip)
    if path.is_dir():
        raise AudioDecodeError(f"{path} is a folder, not a clip; query one or more audio files")
    if not path.exists():
        if path.is_symlink():
            raise AudioDecodeError(f"{path} is a broken symlink (it points to {os.readlink(path)}, which is gone)")
        raise AudioDecodeError(f"no such file: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise AudioDecodeError(f"{path} is an empty file (0 bytes)")


def _validate_index(collection: Collection) -> list[str]:
    """The label names the index knows, sorted; refuses an index with nothing to search."""
    if collection.store.count() == 0:
        raise EmptyIndex(f"index {collection.dir} holds no segments yet; run 'audiosearch ingest FOLDER "
                         f"--index {collection.dir}' first (or see 'audiosearch info --errors')")
    return sorted(collection.store.label_names().values())


def _query_one(collection: Collection, index, net: "Model", matcher: Matcher | None, audio: Audio, clip: str,
               names: list[str], *, filter: bool, k: int, per_file: bool, kinds: str, min_match_seconds: float,
               watch: "_Stopwatch", progress: QueryProgress | None = None) -> QueryResult:
    from .embedder import Embedder  # torch, like Model

    duplicates: list[Match] = []
    follow = None if progress is None else (lambda _, new, done, total: progress.update(clip, done, total))
    with ThreadPoolExecutor(1) as beside:  # the fingerprint match runs while the model embeds
        matching = beside.submit(_timed, matcher.align_samples, audio.samples) if matcher is not None else None
        segments = Embedder(net, workers=0, batch_size=8).embed_audio(audio, on_segments=follow)
        watch.lap("embed")
        if matching is not None:
            alignments, seconds = matching.result()
            watch.laps["match fingerprints (beside the model)"] = seconds
            watch.lap("wait for the fingerprint match")
            duplicates = matcher.resolve(alignments, min_seconds=min_match_seconds, limit=k)
    scores = np.max([s.scores for s in segments], axis=0)
    source = ("--label" if names else "top label") if filter else None
    names = names or ([net.id2label[int(np.argmax(scores))]] if filter else [])
    label_filter = collection.store.label_filter(_label_ids(net, names)) if names else None
    matching = label_filter.count() if label_filter else None
    result = QueryResult([], _top(net, scores), names, matching, clip=clip, filter_source=source,
                         searched=matching if matching is not None else index.ntotal,
                         query_segments=len(segments))
    vectors = np.stack([s.embedding for s in segments])
    similar: list[Hit] = []
    if kinds != "duplicates" and result.matching != 0 and len(duplicates) < k:
        similar, result.plans = _search(collection, index, vectors, k + len(duplicates), label_filter, per_file)
    result.hits = _merge(collection, duplicates, similar, vectors, k)
    result.duplicates = len(duplicates)
    watch.lap("search")
    result.timings = watch.laps
    return result


def _decode_clip(clip: str | Path) -> Audio:
    path = Path(clip)
    try:
        audio = decode(path)
    except AudioDecodeError as e:
        raise AudioDecodeError(f"{path} is {e}") from e
    return audio


def _merge(collection: Collection, duplicates: list[Match], similar: list[Hit], vectors: np.ndarray,
           k: int) -> list[Hit]:
    """Duplicates first (best match first), then similar hits of other files, renumbered, k in all."""
    hits = [_duplicate_hit(collection, m, vectors) for m in duplicates[:k]]
    seen = {m.file_id for m in duplicates}
    for hit in similar:
        if len(hits) == k:
            break
        if hit.file_id not in seen:
            hits.append(hit)
    for rank, hit in enumerate(hits, start=1):
        hit.rank = rank
    return hits


def _duplicate_hit(collection: Collection, m: Match, vectors: np.ndarray) -> Hit:
    """A duplicate as a hit: its closest segment by embedding, as for similar hits; the match says where it matched."""
    ids, ranges, stored = collection.store.file_segments(m.file_id)
    if len(ids) == 0:
        return Hit(0, 0.0, m.path, m.start, m.end, [], -1, m.file_id, m)
    sims = vectors @ stored.T
    best = int(np.argmax(sims.max(axis=0)))
    labels = collection.store.segment_labels([int(ids[best])]).get(int(ids[best]), [])
    start, end = ranges[best]
    return Hit(0, float(sims.max()), m.path, float(start), float(end), labels, int(ids[best]), m.file_id, m)


def resolve_label(name: str, known: list[str]) -> str:
    """The model's spelling of a label (case-insensitive), or UnknownLabel with suggestions."""
    by_lower = {label.lower(): label for label in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else "; see 'audiosearch labels'"
    raise UnknownLabel(f"unknown label {name!r}{hint}")


def _label_ids(net: "Model", names: list[str]) -> list[int]:
    ids = {name: i for i, name in net.id2label.items()}
    return [ids[n] for n in names]


def _top(net: "Model", scores: np.ndarray) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:TOP_LABELS]
    return [(net.id2label[int(i)], float(scores[i])) for i in order]


def _search(collection, index, vectors, k, label_filter, per_file) -> tuple[list[Hit], list[Plan]]:
    """Search each query segment, merge by segment (or file), widening until k distinct files are found."""
    plans: list[Plan] = []
    limit = index.ntotal if label_filter is None else label_filter.count()
    want = k * 4 if per_file else k
    while True:
        best: dict[int, float] = {}
        for vector in vectors:
            scores, ids, plan = search(index, vector[None, :], min(want, max(limit, 1)), filter=label_filter)
            plans.append(plan)
            for s, i in zip(scores[0], ids[0]):
                if i >= 0 and s > best.get(int(i), -np.inf):
                    best[int(i)] = float(s)
        hits = _hits(collection, best, k, per_file)
        if len(hits) >= k or want >= limit or not per_file:
            return hits, plans
        want *= 4


def _hits(collection, best: dict[int, float], k: int, per_file: bool) -> list[Hit]:
    info = collection.store.segment_info(best)
    chosen: list[int] = []
    seen_files: set[int] = set()
    for seg_id in sorted(best, key=lambda i: (-best[i], i)):
        if seg_id not in info:
            continue  # deleted since the index was saved
        file_id = info[seg_id][0]
        if per_file and file_id in seen_files:
            continue
        seen_files.add(file_id)
        chosen.append(seg_id)
        if len(chosen) == k:
            break
    labels = collection.store.segment_labels(chosen)
    return [
        Hit(rank, best[i], info[i][1], info[i][2], info[i][3], labels.get(i, []), i, info[i][0])
        for rank, i in enumerate(chosen, start=1)
    ]


def _timed(fn, *args):
    """fn(*args) and the seconds it took."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


class _Stopwatch:
    """Seconds spent in each named stage, for --explain."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
