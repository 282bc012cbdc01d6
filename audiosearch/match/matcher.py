"""Match a clip against an index's fingerprints: verified duplicates with their ranges, speed and pitch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, decode, to_model_audio
from ..collection import Collection
from ..errors import AudioDecodeError
from .fingerprint import (QUERY_DENSITY, QUERY_FAR, QUERY_NEAR, QUERY_WIDEN, Fingerprint, Triplets, fingerprint,
                          query_keys, triplets)
from .lookup import PrintLookup
from .verify import MIN_INLIERS, MIN_SCORE, PLAUSIBLE_TABLE_BITS, Alignment, align, lag_bins, plausible


@dataclass(frozen=True)
class Match:
    """The query is (in part) the same recording as a library file: where, and how it was changed.

    `speed` is library seconds per query second (1.05: the query plays 5 % faster);
    `pitch` is query frequency over library frequency (1.122: two semitones up). A
    resampled copy has both; a time-stretch changes speed only, a pitch shift pitch only.
    `score` is the share of the query's seconds that were found in this file.
    """

    file_id: int
    path: str
    query_start: float
    query_end: float
    start: float
    end: float
    speed: float
    pitch: float
    score: float
    inliers: int

    def to_dict(self) -> dict:
        """The JSON form used by `query --json`: {"kind": "duplicate", ...}."""
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {"kind": "duplicate", **{k: d[k] for k in ("query_start", "query_end", "start", "end", "speed",
                                                           "pitch", "score")}, "inliers": self.inliers}


class Matcher:
    """Find verified duplicates of clips in one index. Open once, match many clips.

    Example::

        from audiosearch.match import Matcher
        with Matcher.open("indexes/default") as m:
            for hit in m.match_path("clip.wav"):
                print(hit.path, hit.start, hit.end, hit.speed, hit.pitch, hit.score)
    """

    def __init__(self, collection: Collection, lookup: PrintLookup, *, own: bool = False):
        self.collection, self.lookup, self._own = collection, lookup, own

    @classmethod
    def open(cls, index_dir: str | Path) -> Matcher:
        collection = Collection(index_dir)
        try:
            return cls(collection, collection.load_prints(), own=True)
        except BaseException:
            collection.close()
            raise

    def close(self) -> None:
        if self._own:
            self.collection.close()

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def match_path(self, path: str | Path, **options) -> list[Match]:
        """Duplicates of an audio file (see `match_samples` for options)."""
        try:
            audio = decode(Path(path))
        except AudioDecodeError as e:
            raise AudioDecodeError(f"{path} is {e}") from e
        return self.match_samples(audio.samples, **options)

    def match_waveform(self, samples: np.ndarray, rate: int, **options) -> list[Match]:
        """Duplicates of an in-memory signal ([n] or [n, channels], any rate)."""
        return self.match_samples(to_model_audio(np.asarray(samples), rate).samples, **options)

    def match_samples(self, samples: np.ndarray, *, min_seconds: float = 0.0, limit: int | None = None,
                      exclude_file: int | None = None) -> list[Match]:
        """Duplicates of mono samples at the model's rate, best first.

        `min_seconds` drops matches covering less of the query; `exclude_file` leaves out one
        library file (a file matched against its own index).
        """
        return self.resolve(self.align_samples(samples), min_seconds=min_seconds, limit=limit, exclude_file=exclude_file)

    def align_samples(self, samples: np.ndarray) -> list[Alignment]:
        """Verified alignments (by fingerprint id) of mono samples at the model's rate, best first.

        Reads only the lookup, never SQLite, so it may run on another thread (a query runs it
        beside the model); `resolve` then names the files, on the collection's own thread.
        """
        return match_fingerprint(self.lookup, fingerprint(samples, SAMPLE_RATE, density=QUERY_DENSITY))

    def resolve(self, alignments: list[Alignment], *, min_seconds: float = 0.0, limit: int | None = None,
                exclude_file: int | None = None) -> list[Match]:
        """Alignments (by fingerprint id) as Matches of files that are still in the index."""
        files = self.collection.store.print_files([a.fp_id for a in alignments])
        out: list[Match] = []
        for a in alignments:
            if a.fp_id not in files or a.query_end - a.query_start < min_seconds:
                continue
            file_id, path, duration = files[a.fp_id]
            if file_id == exclude_file:
                continue
            end = min(a.end, duration) if duration else a.end
            out.append(Match(file_id, path, a.query_start, a.query_end, max(0.0, a.start), end, a.speed, a.pitch,
                             a.score, a.inliers))
            if limit is not None and len(out) == limit:
                break
        return out


def match_fingerprint(lookup: PrintLookup, fp: Fingerprint, *, min_inliers: int = MIN_INLIERS,
                      min_score: float = MIN_SCORE, near: int = QUERY_NEAR, far: int = QUERY_FAR,
                      widen: float = QUERY_WIDEN, table_bits: int = PLAUSIBLE_TABLE_BITS) -> list[Alignment]:
    """Verified alignments of a (query-density) fingerprint in a lookup index, best first.

    `near`, `far` and `widen` set the query's triplets: a stored (library-density) fingerprint
    matched against its own index (match.dupes) uses the library's, which are the same triplets.
    `table_bits` sizes the pre-filter's table (see verify.plausible).
    """
    tr = triplets(fp, near, far, widen)
    if len(tr) == 0:
        return []
    least = least_inliers(fp, min_inliers)
    rows, entries = collisions(lookup, tr, fp.short, least, table_bits)
    return align(tr, query_bins(fp), rows, entries, min_inliers=least, min_score=min_score,
                 bin_seconds=score_bin(fp))


def collisions(lookup: PrintLookup, tr: Triplets, short: bool, least: int,
               table_bits: int = PLAUSIBLE_TABLE_BITS) -> tuple[np.ndarray, np.ndarray]:
    """(query triplet of each collision, the stored entry), of the files that could align `least` of them."""
    probe_keys, rows = query_keys(tr, short)
    probe_ms = np.round(tr.t1 * 1000).astype(np.int32)[rows]

    def candidates_only(probe: np.ndarray, ordinal: np.ndarray, ms: np.ndarray) -> np.ndarray:
        return plausible(ordinal, lag_bins(ms, np.take(probe_ms, probe)), least, table_bits)  # as `align` bins them

    probe, entries = lookup.lookup(probe_keys, keep=candidates_only)
    return rows[probe], entries


def query_bins(fp: Fingerprint) -> np.ndarray:
    """The time bins (of `score_bin`) holding the query's peaks, which a score counts."""
    return np.unique(np.floor(fp.times / score_bin(fp)).astype(np.int64))


def score_bin(fp: Fingerprint) -> float:
    """Seconds per bin of a score: 50 ms for a clip under 2 s, else 1 s."""
    return SHORT_BIN if fp.short else 1.0


SHORT_BIN = 0.05


def least_inliers(fp: Fingerprint, default: int) -> int:
    """A clip of a fraction of a second holds few triplets: ask for fewer, all of them aligned."""
    return default if not fp.short else max(4, min(default, int(len(fp) // 4)))
