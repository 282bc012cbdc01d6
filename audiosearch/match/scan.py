"""`audiosearch scan`: every place where library audio occurs inside a long recording.

The recording is decoded as a stream (`audio.open_stream`: a few MiB whatever its
length) and cut into overlapping windows of WINDOW_SECONDS every HOP_SECONDS. Each
window is fingerprinted and matched as a query clip is (`match_fingerprint`, at the
query's density), so speed and pitch changes are found as `query` finds them. A
window can hold a short excerpt among other sounds, so a match is accepted on the
seconds it covers (MIN_COVERED_SECONDS), not on the share of the window it fills.
Matches of one library file that continue each other (same speed, same line through
recording and file time) are merged across windows into one occurrence.

Where an occurrence reaches within SNAP_SECONDS of its file's start or end, its
range is extended along the fitted line to that edge: the first and last peaks of a
sound lie a little inside it, and a whole file planted in a recording should be
reported whole.

With `similar`, a second pass (the recording streamed again) embeds every model
segment (SEGMENT_SECONDS) that no occurrence overlaps and lists the library sounds
nearest to it, filtered by its top label as `query` does: what the recording holds
that is like the library without being the same recording. Only this pass loads the
model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..audio import SAMPLE_RATE, SEGMENT_SECONDS, Audio, open_stream
from ..errors import AudioDecodeError
from .fingerprint import BANDS_PER_OCTAVE, QUERY_DENSITY, Fingerprint, fingerprint
from .matcher import Matcher, match_fingerprint
from .verify import MIN_INLIERS, Alignment

WINDOW_SECONDS = 15.0
HOP_SECONDS = 10.0  # windows overlap by 5 s: any passage of up to 5 s lies whole in one of them
MIN_COVERED_SECONDS = 3  # seconds of a window in which an aligned triplet starts, for a match to count
# ... and aligned triplets: a window meets a whole library, so chance alignments of sounds built of the
# same notes (a tune a semitone away) are far more frequent than for one query clip. In the benchmark
# (benchmarks/scan.py) 95 % of chance alignments had under 22, true ones (edited too) 49 or more.
MIN_SCAN_INLIERS = 40
SNAP_SECONDS = 0.25  # an occurrence this close to its file's start or end is extended to it
MERGE_GAP_SECONDS = 2.0  # matches of one file further apart than this in the recording stay separate
MERGE_OFFSET_SECONDS = 0.25  # ... or whose lines disagree by more than this on where the file is
MERGE_SPEED = 0.02  # ... or whose speeds differ by more than this


@dataclass(frozen=True)
class Occurrence:
    """Library audio found in the recording: where in each, and how it was changed.

    `start`/`end` are recording seconds; `file_start`/`file_end` the library file's.
    `speed` is library seconds per recording second (1.05: the recording plays it 5 %
    faster) and `pitch` recording frequency over library frequency, as for `Match`.
    `score` is the share of the occurrence's seconds in which aligned peaks were found.
    """

    file_id: int
    path: str
    start: float
    end: float
    file_start: float
    file_end: float
    speed: float
    pitch: float
    score: float
    inliers: int

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SimilarStretch:
    """A segment of the recording that holds no library audio, and the library sounds nearest to it."""

    start: float
    end: float
    labels: list[tuple[str, float]]  # the segment's own top predictions
    hits: list  # query.Hit, all "similar"

    def to_dict(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3),
                "labels": [{"label": name, "score": round(score, 4)} for name, score in self.labels],
                "hits": [h.to_dict() for h in self.hits]}


FORMAT_VERSION = 1  # of ScanResult.to_dict(), the `scan --json` object (README: "scan")


@dataclass
class ScanResult:
    recording: str
    duration: float  # seconds of the recording, as decoded
    occurrences: list[Occurrence] = field(default_factory=list)
    windows: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # CPU-free wall seconds per stage
    similar: list[SimilarStretch] | None = None  # with `similar` only

    @property
    def realtime(self) -> float:
        """Recording seconds matched per second of matching work (fingerprints + lookup + verify)."""
        work = self.timings.get("fingerprint", 0.0) + self.timings.get("match", 0.0)
        return self.duration / work if work else math.inf

    def to_dict(self) -> dict:
        out = {"format_version": FORMAT_VERSION, "recording": self.recording, "duration": round(self.duration, 3),
               "windows": self.windows, "occurrences": [o.to_dict() for o in self.occurrences],
               "timings": {k: round(v, 4) for k, v in self.timings.items()}}
        if self.similar is not None:
            out["similar"] = [s.to_dict() for s in self.similar]
        return out


class ScanProgress(Protocol):
    def start(self, seconds: float | None) -> None: ...
    def update(self, seconds: float, found: int) -> None: ...
    def similar(self, seconds: float, total: float | None, found: int) -> None: ...  # the --similar pass


def scan(recording: str | Path, *, index_dir: str | Path, min_seconds: float = 0.0, similar: int | None = None,
         model: str | None = None, device: str = "auto", precision: str = "auto",
         progress: ScanProgress | None = None) -> ScanResult:
    """Occurrences of the index's files in `recording`, in recording order (see module doc).

    `min_seconds` drops occurrences shorter than that (recording seconds). `similar`: also the
    `similar` nearest library sounds of each segment that holds no occurrence (loads the model:
    `model`, `device`, `precision` as for `query`).
    """
    path = Path(recording)
    if path.is_dir():
        raise AudioDecodeError(f"{path} is a folder, not a recording; scan one audio file")
    if not path.exists():
        raise AudioDecodeError(f"no such file: {path}")
    searcher = None
    if similar is not None:
        from ..query import Searcher  # checks the index holds segments before anything is decoded

        searcher = Searcher(index_dir, model=model, device=device, precision=precision, fingerprints=False)
    try:
        with Matcher.open(index_dir) as matcher, _naming(path), open_stream(path) as stream:
            if progress:
                progress.start(stream.duration)
            result = ScanResult(str(path), 0.0)
            result.occurrences = scan_blocks(matcher, stream, result, min_seconds=min_seconds, progress=progress)
        if searcher is not None:
            started = time.perf_counter()
            with _naming(path), open_stream(path) as stream:
                result.similar = similar_stretches(searcher, stream, result.occurrences, k=similar,
                                                   progress=progress, total=result.duration)
            result.timings["similar"] = time.perf_counter() - started
    finally:
        if searcher is not None:
            searcher.close()
    return result


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A decoding error inside names the recording: "PATH is not readable audio ..."."""
    try:
        yield
    except AudioDecodeError as e:
        raise AudioDecodeError(f"{path} is {e}") from e


def similar_stretches(searcher, blocks: Iterable[np.ndarray], occurrences: list[Occurrence], *, k: int = 3,
                      progress: ScanProgress | None = None, total: float | None = None) -> list[SimilarStretch]:
    """The `k` library sounds nearest (by embedding, filtered by the segment's top label) to each
    SEGMENT_SECONDS segment of the stream that no occurrence overlaps; silent segments are left out."""
    covered = sorted((o.start, o.end) for o in occurrences)
    out = []
    for start, samples in windows(blocks, SEGMENT_SECONDS, SEGMENT_SECONDS):
        end = start + len(samples) / SAMPLE_RATE
        if not any(a < end and b > start for a, b in covered) and np.any(samples):
            found = searcher.query(Audio(np.ascontiguousarray(samples), SAMPLE_RATE, 1), k=k, kinds="similar",
                                   name=f"the recording at {start:.2f} s")
            out.append(SimilarStretch(start, end, found.query_labels, found.hits))
        if progress:
            progress.similar(end, total, len(out))
    return out


def scan_blocks(matcher: Matcher, blocks: Iterable[np.ndarray], result: ScanResult | None = None, *,
                min_seconds: float = 0.0, progress: ScanProgress | None = None) -> list[Occurrence]:
    """Occurrences in a stream of mono blocks at the model's rate (the recording, block by block).

    Fills `result`'s duration, window count and timings when given.
    """
    result = result if result is not None else ScanResult("<stream>", 0.0)
    timings = {"decode": 0.0, "fingerprint": 0.0, "match": 0.0}
    found: list[Occurrence] = []
    files = _Files()
    latest: dict[int, Occurrence] = {}  # each file's last match, to count passages as they are found
    passages = 0
    clock = time.perf_counter()
    for offset, window in windows(blocks):
        now = time.perf_counter()
        timings["decode"] += now - clock
        fp = fingerprint(window, SAMPLE_RATE, density=QUERY_DENSITY)
        clock = time.perf_counter()
        timings["fingerprint"] += clock - now
        for o in _window_matches(matcher, fp, offset, files):
            last = latest.get(o.file_id)
            passages += last is None or not _continues(last, o)
            latest[o.file_id] = o
            found.append(o)
        now = time.perf_counter()
        timings["match"] += now - clock
        result.windows += 1
        result.duration = offset + len(window) / SAMPLE_RATE
        if progress:
            progress.update(result.duration, passages)
        clock = time.perf_counter()
    timings["decode"] += time.perf_counter() - clock
    result.timings = timings
    merged = [snap(o, files.peaks.get(o.file_id), files.durations.get(o.file_id), result.duration)
              for o in merge(found)]
    return [o for o in merged if o.end - o.start >= min_seconds]


def windows(blocks: Iterable[np.ndarray], window_seconds: float = WINDOW_SECONDS,
            hop_seconds: float = HOP_SECONDS) -> Iterator[tuple[float, np.ndarray]]:
    """(start in seconds, samples) of overlapping windows over a stream, holding one window at a time.

    The last window ends with the stream; a stream shorter than one window is one window.
    """
    size, hop = round(window_seconds * SAMPLE_RATE), round(hop_seconds * SAMPLE_RATE)
    buffer = np.empty(0, np.float32)
    start = 0  # stream sample at which `buffer` begins
    covered = 0  # stream samples inside some window yielded so far
    for block in blocks:
        buffer = np.concatenate([buffer, block]) if len(buffer) else np.asarray(block, np.float32)
        while len(buffer) >= size:
            yield start / SAMPLE_RATE, buffer[:size]
            covered = start + size
            buffer, start = buffer[hop:], start + hop
    if start + len(buffer) > covered and len(buffer):
        yield start / SAMPLE_RATE, buffer


def _window_matches(matcher: Matcher, fp: Fingerprint, offset: float, files: _Files) -> list[Occurrence]:
    """The window's verified matches, in recording time, that cover enough seconds, their ends refined."""
    if len(fp) == 0:
        return []
    bins = len(np.unique(np.floor(fp.times).astype(np.int64)))
    need = min(MIN_COVERED_SECONDS, bins) / max(1, bins)  # a recording shorter than that: all of it
    # a recording shorter than one window is a clip: the query's own threshold then
    least = MIN_INLIERS if offset == 0 and fp.duration < WINDOW_SECONDS else MIN_SCAN_INLIERS
    alignments = match_fingerprint(matcher.lookup, fp, min_inliers=least, min_score=need)
    out = []
    for a in alignments:
        known = files.get(matcher, a.fp_id)
        if known is None:  # its file left the index since the lookup was saved
            continue
        file_id, path, duration, peaks = known
        q_start, q_end = extend(a, fp, peaks)
        length = max(1.0, math.ceil(a.query_end - a.query_start))
        start = a.start + a.speed * (q_start - a.query_start)
        end = a.start + a.speed * (q_end - a.query_start)
        out.append(Occurrence(file_id, path, offset + q_start, offset + q_end, max(0.0, start),
                              min(end, duration) if duration else end, a.speed, a.pitch,
                              min(1.0, a.score * bins / length), a.inliers))
    return out


class _Files:
    """Library files met so far, by fingerprint id: (file id, path, duration, stored peaks)."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[int, str, float | None, Fingerprint] | None] = {}
        self.durations: dict[int, float | None] = {}  # by file id
        self.peaks: dict[int, Fingerprint] = {}  # by file id

    def get(self, matcher: Matcher, fp_id: int) -> tuple[int, str, float | None, Fingerprint] | None:
        if fp_id not in self.known:
            files = matcher.collection.store.print_files([fp_id])
            blobs = [row for batch in matcher.collection.store.iter_prints(np.array([fp_id])) for row in batch]
            if fp_id in files and blobs:
                file_id, path, duration = files[fp_id]
                self.known[fp_id] = (file_id, path, duration, Fingerprint.from_bytes(blobs[0][2]))
                self.durations[file_id] = duration
                self.peaks[file_id] = self.known[fp_id][3]
            else:
                self.known[fp_id] = None
        return self.known[fp_id]


PEAK_SECONDS = 0.025  # a recording peak and a library peak this close (after the fitted line) are one
PEAK_BANDS = 1.0  # ... and this close in frequency (after the fitted pitch)
EXTEND_GAP = 0.4  # seconds: a range grows peak by peak while matched peaks are at most this far apart


def extend(a: Alignment, fp: Fingerprint, library: Fingerprint) -> tuple[float, float]:
    """The alignment's query range grown to the outermost single peaks that match the library under its
    line and pitch: its triplets stop short of the ends (a triplet's last peak must match too)."""
    if len(library) == 0:
        return a.query_start, a.query_end
    offset = a.start - a.speed * a.query_start
    shift = BANDS_PER_OCTAVE * math.log2(a.pitch)
    lib_t = offset + a.speed * fp.times
    lib_b = fp.bands - shift
    lo = np.searchsorted(library.times, lib_t - PEAK_SECONDS * a.speed, side="left")
    hi = np.searchsorted(library.times, lib_t + PEAK_SECONDS * a.speed, side="right")
    matched = np.zeros(len(fp), dtype=bool)
    for k in range(int((hi - lo).max(initial=0))):
        j = np.minimum(lo + k, len(library) - 1)
        matched |= (lo + k < hi) & (np.abs(library.bands[j] - lib_b) <= PEAK_BANDS)
    times = fp.times[matched]
    start, end = a.query_start, a.query_end
    for t in times[times < start][::-1]:
        if start - t > EXTEND_GAP:
            break
        start = t
    for t in times[times > end]:
        if t - end > EXTEND_GAP:
            break
        end = t
    return float(start), float(end)


def merge(found: list[Occurrence]) -> list[Occurrence]:
    """One occurrence per continuous passage of one file (see MERGE_*), in recording order, without
    the weak ones that a far stronger occurrence of another file explains (see `explained`)."""
    out: list[Occurrence] = []
    for o in sorted(found, key=lambda o: (o.file_id, o.start)):
        last = out[-1] if out else None
        if last is not None and _continues(last, o):
            out[-1] = _joined(last, o)
        else:
            out.append(o)
    return sorted((o for o in out if not explained(o, out)), key=lambda o: (o.start, o.path))


WEAK_INLIERS = 2 * MIN_SCAN_INLIERS  # an occurrence with fewer aligned triplets than this is weak ...
STRONGER = 5  # ... and explained away by one of another file with this many times its inliers over it


def explained(o: Occurrence, others: list[Occurrence]) -> bool:
    """A weak match inside a far stronger one of another file: two library sounds built of the same
    notes (or bursts) align by chance over a few seconds, and the recording there is the stronger's."""
    if o.inliers >= WEAK_INLIERS:
        return False
    for p in others:
        overlap = min(o.end, p.end) - max(o.start, p.start)
        if p.file_id != o.file_id and p.inliers >= STRONGER * o.inliers and overlap >= 0.5 * (o.end - o.start):
            return True
    return False


def _continues(a: Occurrence, b: Occurrence) -> bool:
    """b (starting after a) is the same passage of the same file: a's line puts the file where b says,
    at both of b's ends. Speeds are not compared: one fitted over a short stretch is loose."""
    if a.file_id != b.file_id or b.start > a.end + MERGE_GAP_SECONDS:
        return False
    tolerance = MERGE_OFFSET_SECONDS * max(1.0, a.speed)
    at_start = a.file_start + a.speed * (b.start - a.start)
    at_end = a.file_start + a.speed * (b.end - a.start)
    return abs(at_start - b.file_start) <= tolerance and abs(at_end - b.file_end) <= tolerance + MERGE_SPEED * (
        b.end - b.start)


def _joined(a: Occurrence, b: Occurrence) -> Occurrence:
    weight = a.inliers + b.inliers
    span_a, span_b = a.end - a.start, b.end - b.start
    end = max(a.end, b.end)
    file_end = a.file_end if a.end >= b.end else b.file_end
    score = (a.score * span_a + b.score * span_b) / max(span_a + span_b, 1e-9)
    return Occurrence(a.file_id, a.path, a.start, end, a.file_start, file_end,
                      (a.speed * a.inliers + b.speed * b.inliers) / weight,
                      (a.pitch * a.inliers + b.pitch * b.inliers) / weight, min(1.0, score), weight)


def snap(o: Occurrence, library: Fingerprint | None, duration: float | None, recording_end: float) -> Occurrence:
    """Extend an occurrence to its file's start or end when the file holds no peak beyond it (silence,
    a fade) or it stops within SNAP_SECONDS of the edge, within the recording."""
    start, file_start, end, file_end = o.start, o.file_start, o.end, o.file_end
    times = library.times if library is not None else np.zeros(0)
    quiet_before = not np.any(times < file_start - PEAK_SECONDS)
    quiet_after = not np.any(times > file_end + PEAK_SECONDS)
    if file_start < SNAP_SECONDS or quiet_before:
        start, file_start = max(0.0, start - file_start / o.speed), 0.0
    if duration and (duration - file_end < SNAP_SECONDS or quiet_after):
        end, file_end = min(recording_end, end + (duration - file_end) / o.speed), duration
    return Occurrence(o.file_id, o.path, start, end, file_start, file_end, o.speed, o.pitch, o.score, o.inliers)
