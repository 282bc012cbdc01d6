"""From key collisions to verified duplicates: one time offset, one time scale, one frequency scale.

Each collision between a query triplet and a stored one says "query time q
is library time r, at tempo ratio s and pitch ratio p". For a true copy the
pairs (q, r) lie on one line r = offset + speed * q, and their frequency
ratios agree. Collisions by chance do not. So, per candidate file:

1. a Hough vote over (speed, offset): speed on a 0.5 % grid over the
   supported range, offset in bins of two frames; each collision votes only
   for speeds near its own span ratio;
2. the winning line's inliers are refined by least squares, and kept only
   if their frequency ratios agree with the median;
3. the verdict: enough inliers, spread over enough of the query's seconds.

The score is that spread: the share of the query's seconds (those holding
any peak) in which an aligned triplet starts (for clips under 2 s: the 50 ms
bins an aligned triplet spans).
1.0 means every second of the query was found in the library file at the
reported place, speed and pitch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fingerprint import BANDS_PER_OCTAVE, Triplets

MIN_SPEED, MAX_SPEED = 0.85, 1.18  # time-scale factors searched (±10 % edits, with room)
MAX_PITCH_STEP = 4.0  # semitones either way
SPEED_STEP = 0.005
SPAN_TOLERANCE = 0.12  # a collision's own span ratio may differ this much from the line's speed
OFFSET_BIN = 0.064  # seconds
INLIER_SECONDS = 0.02  # distance from the fitted line (a frame is 32 ms: a copy's peaks lie within half of one)
PITCH_TOLERANCE = 0.35  # bands from the median frequency shift (peak bands are interpolated)
CANDIDATES = 32  # files verified per query, by collisions that agree on a lag (see _consistent_counts)
CANDIDATE_MS = 1000  # lag per bin of that count (integer ms: the pre-filter bins exactly as align does)
SHORT_FIT = 0.5  # seconds: inliers spread over less than this give no reliable slope

MIN_INLIERS = 14  # strength-chosen triplets give a true copy ~2x the inliers of time-ordered ones (p5: 70)
MIN_SCORE = 0.45


@dataclass(frozen=True)
class Alignment:
    """A verified placement of the query in one stored fingerprint."""

    fp_id: int
    query_start: float
    query_end: float
    start: float
    end: float
    speed: float  # library seconds per query second: >1 means the query plays faster
    pitch: float  # query frequency / library frequency
    score: float  # share of the query's seconds that matched
    inliers: int


def align(query: Triplets, query_bins: np.ndarray, probe_rows: np.ndarray, entries: np.ndarray,
          *, min_inliers: int = MIN_INLIERS, min_score: float = MIN_SCORE, bin_seconds: float = 1.0) -> list[Alignment]:
    """Verified alignments, best first, from collisions (`probe_rows[i]` is the query triplet of entry i).

    `query_bins` lists the time bins (of `bin_seconds`) of the query that hold peaks: the score is
    the share of them in which an aligned triplet starts.
    """
    if len(entries) == 0:
        return []
    q_t = query.t1[probe_rows]
    q_span = query.span[probe_rows]
    q_b = query.b1[probe_rows]
    r_t = entries["ms"] / 1000.0
    r_span = entries["span"] / 1000.0
    r_b = entries["band"] / 64.0
    ratio = np.divide(r_span, q_span, out=np.ones(len(q_span)), where=(q_span > 0) & (r_span > 0))
    pitch_bands = q_b - r_b
    ok = (ratio > MIN_SPEED * (1 - SPAN_TOLERANCE)) & (ratio < MAX_SPEED * (1 + SPAN_TOLERANCE))
    ok &= np.abs(pitch_bands) <= MAX_PITCH_STEP * BANDS_PER_OCTAVE / 12
    # every collision of one file together, in their original order, for the per-file verification
    rows = np.nonzero(ok)[0]
    fp = entries["fp"][rows].astype(np.int64)
    by_file = np.argsort(fp, kind="stable")
    rows, fp = rows[by_file], fp[by_file]
    q_t, r_t, ratio, pitch_bands, q_span = q_t[rows], r_t[rows], ratio[rows], pitch_bands[rows], q_span[rows]
    fps, counts = _consistent_counts(fp, lag_bins(entries["ms"][rows], np.round(q_t * 1000)))  # peak times: whole ms
    order = np.argsort(-counts, kind="stable")[:CANDIDATES]
    best = fps[order][counts[order] >= min_inliers]
    out = []
    for fp_id in best:
        lo, hi = np.searchsorted(fp, [fp_id, fp_id + 1])
        sel = slice(lo, hi)
        a = _verify(int(fp_id), q_t[sel], r_t[sel], ratio[sel], pitch_bands[sel], q_span[sel], query_bins,
                    bin_seconds)
        if a is not None and a.inliers >= min_inliers and a.score >= min_score:
            out.append(a)
    out.sort(key=lambda a: (-a.score, -a.inliers, a.fp_id))
    return out


def lag_bins(library_ms: np.ndarray, query_ms: np.ndarray) -> np.ndarray:
    """The CANDIDATE_MS bin of each collision's library-minus-query lag (int32; floor, in whole ms)."""
    return (library_ms.astype(np.int32) - query_ms.astype(np.int32)) // np.int32(CANDIDATE_MS)


def _consistent_counts(fp: np.ndarray, lag_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per file, the most collisions that agree on the library-minus-query lag to within two bins (`lag_bins`).

    Which files to verify: a true copy's collisions pile up at one lag (drifting by at most
    (speed - 1) x the clip's length), chance ones spread over the whole file. Ranked by raw
    counts, a noisy or mixed query lost its source behind long files of the same kind.
    """
    if len(fp) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cells, counts = np.unique((fp << 32) + (lag_bin.astype(np.int64) + (1 << 31)), return_counts=True)
    nxt = np.minimum(np.searchsorted(cells, cells + 1), len(cells) - 1)
    pair = counts + np.where(cells[nxt] == cells + 1, counts[nxt], 0)
    files, starts = np.unique(cells >> 32, return_index=True)
    return files, np.maximum.reduceat(pair, starts)


PLAUSIBLE_TABLE_BITS = 20  # at most this many cells in the hashed count of `plausible` (a 2 MiB table)
_CELL_HASH = 0x9E3779B1  # odd: spreads consecutive ordinals over the table; cell + 1 stays the next lag bin


def plausible(group: np.ndarray, lag_bin: np.ndarray, min_count: int, max_bits: int = PLAUSIBLE_TABLE_BITS) -> np.ndarray:
    """Which collisions belong to a group (file) that could become a candidate in `align`.

    A candidate needs `min_count` collisions within two neighbouring bins of lag (`lag_bins`)
    (`_consistent_counts`). Counted here in a hashed table, where a cell's count can only be too
    high, so no candidate is lost: every collision of a group with one such pair of cells is kept,
    whatever its lag, because `_verify` reads them all. At 10,000 hours nearly all of a clip's
    ~2 M collisions are chance ones, spread over a million files: they are dropped before they
    are unpacked, sorted or counted exactly. `group` is any integer that tells files apart
    (a run's ordinals). The table has about 2 cells a collision, up to 2**max_bits: a bigger one
    costs more to fill and read but lets fewer files through by sharing a cell with a candidate.
    """
    bits = min(max_bits, max(10, len(group).bit_length() + 1))
    mask = (1 << bits) - 1
    group = group.astype(np.uint32, copy=False)  # 32-bit products wrap, but keep their low bits: all the cell needs
    cell = (group * np.uint32(_CELL_HASH) + lag_bin.astype(np.int32, copy=False).view(np.uint32)) & np.uint32(mask)
    # capped at min_count (enough is enough) in 16 bits: the sums below then stay small, and cheap to make
    counts = np.minimum(np.bincount(cell, minlength=mask + 1), min_count, out=np.empty(mask + 1, np.uint16),
                        casting="unsafe")
    wrapped = np.concatenate([counts[-1:], counts, counts[:1]])  # cell - 1 and cell + 1 wrap, as the hash does
    enough = counts + np.maximum(wrapped[:-2], wrapped[2:]) >= min_count  # per cell, with either neighbour
    groups = np.zeros(mask + 1, dtype=bool)
    groups[np.take(group, np.flatnonzero(np.take(enough, cell))) & np.uint32(mask)] = True  # few: ~1 % at 10,000 h
    return np.take(groups, group & np.uint32(mask))  # take, not [...]: 5x faster from a table this size


_SPEEDS = np.arange(MIN_SPEED, MAX_SPEED + SPEED_STEP / 2, SPEED_STEP)


def _verify(fp_id, q_t, r_t, ratio, pitch_bands, q_span, query_bins, bin_seconds) -> Alignment | None:
    # 1. Hough vote: offset = r - s q for every speed s near the collision's own ratio.
    offsets = r_t[:, None] - _SPEEDS[None, :] * q_t[:, None]  # [m, speeds]
    near = np.abs(ratio[:, None] / _SPEEDS[None, :] - 1) < SPAN_TOLERANCE
    bins = np.floor(offsets / OFFSET_BIN).astype(np.int64)
    lo = bins.min()
    cells = (bins - lo) * len(_SPEEDS) + np.arange(len(_SPEEDS))[None, :]
    votes = np.bincount(cells[near], minlength=0)
    if votes.size == 0:
        return None
    # neighbouring offset bins share a line that straddles a bin edge
    width = len(_SPEEDS)
    padded = np.concatenate([votes, np.zeros(width, votes.dtype)])
    smoothed = padded[:-width] + padded[width:]
    cell = int(np.argmax(smoothed))
    speed = _SPEEDS[cell % width]
    offset = (cell // width + lo + 1) * OFFSET_BIN
    # 2. refine: least squares on the inliers, twice; then the frequency ratio must agree.
    inl = np.abs(r_t - (offset + speed * q_t)) < 2 * OFFSET_BIN
    for _ in range(2):
        if inl.sum() < 3:
            return None
        pitch_ref = np.median(pitch_bands[inl])
        inl &= np.abs(pitch_bands - pitch_ref) <= PITCH_TOLERANCE
        if inl.sum() < 3:
            return None
        if np.ptp(q_t[inl]) < SHORT_FIT:  # too short a stretch for a slope: the spans' own ratio says the speed
            speed_fit = float(np.clip(np.median(ratio[inl]), MIN_SPEED, MAX_SPEED))
            offset_fit = float(np.median(r_t[inl] - speed_fit * q_t[inl]))
        else:
            speed_fit, offset_fit = np.polyfit(q_t[inl], r_t[inl], 1)
        if not MIN_SPEED <= speed_fit <= MAX_SPEED:
            speed_fit, offset_fit = speed, offset
        speed, offset = speed_fit, offset_fit
        inl = (np.abs(r_t - (offset + speed * q_t)) < INLIER_SECONDS) & (np.abs(pitch_bands - pitch_ref) <= PITCH_TOLERANCE)
    n = int(inl.sum())
    if n < 3:
        return None
    pitch = 2.0 ** (np.median(pitch_bands[inl]) / BANDS_PER_OCTAVE)
    q_start = float(q_t[inl].min())
    q_end = float((q_t[inl] + q_span[inl]).max())
    # Bins in which an aligned triplet starts; for short clips (small bins), every bin it spans:
    # a sub-second sound has too few anchors to cover its own bins. Counting spans on long clips
    # would let a chance alignment of two notes cover three seconds.
    first = np.floor(q_t[inl] / bin_seconds).astype(np.int64)
    last = np.floor((q_t[inl] + q_span[inl]) / bin_seconds).astype(np.int64) if bin_seconds < 1 else first
    covered = np.zeros(int(last.max()) + 2, dtype=np.int64)
    np.add.at(covered, first, 1)
    np.add.at(covered, last + 1, -1)
    bins = np.nonzero(np.cumsum(covered) > 0)[0]  # every bin some aligned triplet spans
    score = len(np.intersect1d(bins, query_bins)) / max(1, len(query_bins))
    return Alignment(fp_id, q_start, q_end, float(offset + speed * q_start), float(offset + speed * q_end),
                     float(speed), float(pitch), float(score), n)
