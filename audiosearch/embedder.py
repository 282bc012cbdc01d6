"""Files in, AST embeddings out: the one pipeline behind `ingest`, `embed` and the Python API.

Worker processes decode and resample (decode_pool); this process cuts
segments, packs them into fixed-size batches across file boundaries, and runs
features + model on the model's device. Files come out as soon as their last
segment has been through the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, SEGMENT_SAMPLES, SEGMENT_SECONDS, Audio, Cutter, Segment, segment_count, to_model_audio
from .decode_pool import Decoded, DecodePool
from .errors import AudioDecodeError
from .model_ref import DEFAULT_MODEL

if TYPE_CHECKING:  # torch is imported when an Embedder is made, so that Tally and the results stay light
    import torch

    from .model import Model, PendingOutput


@dataclass
class SegmentEmbedding:
    """One segment's features: its time range in the file and what the model said."""

    start: float
    end: float
    embedding: np.ndarray  # float32 [D], unit norm
    scores: np.ndarray  # float32 [labels], sigmoid
    tokens: np.ndarray | None = None  # float32 [T', F', D] when asked for


@dataclass
class FileEmbedding:
    """A file's segments, or why it has none (`status` is ok, failed or skipped)."""

    key: object
    path: str
    status: str
    error: str | None = None
    segments: list[SegmentEmbedding] = field(default_factory=list)
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    hash: str | None = None
    prints: bytes | None = None  # the file's fingerprint (match.fingerprint), when ingest asked for it


# (the file's result so far, the segments just embedded, segments done, segments in the file)
SegmentsDone = Callable[[FileEmbedding, list[SegmentEmbedding], int, int], None]
# segments of a decoded file embedded before, by (start, end): reused as they are
KnownSegments = Callable[[Decoded], dict[tuple[float, float], SegmentEmbedding]]

DECODE_NICE = 10  # decoders' niceness when the model runs on the CPU
# The model's shortest analysis window: one 25 ms log-mel frame. A clip shorter than this has no
# frame at all (the features would be all padding), so it is zero-padded at its end to one frame;
# longer clips are fed as they are, so their embeddings do not change.
MIN_SAMPLES = 400  # logmel.FRAME_LENGTH (not imported here: logmel imports torch)


@dataclass
class Tally:
    """What a run over files produced: segments and audio from good files, failed and skipped ones with reasons."""

    segments: int = 0
    audio_seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def count(self, result: FileEmbedding) -> bool:
        """Record one file's outcome; True when it was embedded."""
        if result.status == "failed":
            self.failed.append((result.path, result.error or "unknown error"))
        elif result.status == "skipped":
            self.skipped.append((result.path, result.error or ""))
        else:
            self.segments += len(result.segments)
            self.audio_seconds += result.duration or 0.0
        return result.status == "ok"


def expand_folders(paths: Iterable[str | Path]) -> tuple[list[str], list]:
    """Files as given, folders replaced by the audio files under them; and what could not be listed."""
    from .ingest import Unreadable, scan  # ingest builds on this module

    files: list[str] = []
    unreadable: list[Unreadable] = []
    for p in paths:
        if Path(p).is_dir():
            found, _ = scan([Path(os.path.abspath(p))], unreadable)
            files.extend(f.path for f in found)
        else:
            files.append(str(p))
    return files, unreadable


def default_batch_size(device: torch.device) -> int:
    """GPUs want big batches. On a CPU throughput levels off by 8 (bf16 AST, 2-core AMX Xeon:
    3.2 segments/s at 2, 3.35 at 4, 3.45 at 8 and 16; BENCHMARKS.md)."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    """Decoding is cheap next to AST on a CPU; a GPU needs many decoders to stay fed
    (one core per decoder, one left for the process driving the GPU)."""
    return max(1, usable_cores() - 1) if device.type == "cuda" else 1


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a job scheduler)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class Embedder:
    """Embed files or waveforms with an AST checkpoint, in batches, on the best device.

    Example::

        from audiosearch import Embedder
        emb = Embedder(model="path/to/checkpoint", device="auto")
        for f in emb.embed_files(["a.wav", "b.flac"]):
            print(f.path, [(s.start, s.end, s.embedding.shape) for s in f.segments])
    """

    def __init__(
        self,
        model: str | Model = DEFAULT_MODEL,
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        hop_seconds: float = SEGMENT_SECONDS,
        tokens: bool = False,
    ):
        import torch

        from .model import Model

        self.model = model if isinstance(model, Model) else Model(model, device=device, precision=precision)
        self.batch_size = batch_size or default_batch_size(self.model.device)
        self.workers = default_workers(self.model.device) if workers is None else workers
        # On a CPU the model's threads own every core: decoders yield to them (see DecodePool).
        self.decode_nice = 0 if self.model.device.type == "cuda" else DECODE_NICE
        self.hop_seconds = hop_seconds
        self.tokens = tokens
        # On a GPU one batch is in flight while the next is filled: two pinned staging slots, so
        # the copies to the device never wait on pageable memory (which would sync the stream).
        pin = self.model.device.type == "cuda"
        self._slots = [
            (torch.zeros(self.batch_size, SEGMENT_SAMPLES, pin_memory=pin),
             torch.zeros(self.batch_size, dtype=torch.int64, pin_memory=pin))
            for _ in range(2 if pin else 1)
        ]
        self._next_slot = 0
        self._slot_pending: list[PendingOutput | None] = [None] * len(self._slots)  # each slot's last batch
        self._in_flight: tuple[list[tuple[_Job, int, Segment]], PendingOutput] | None = None
        self._on_segments: SegmentsDone | None = None  # the hooks of the current `run`
        self._known: KnownSegments | None = None

    def embed_files(self, paths: Iterable[str | Path]) -> Iterator[FileEmbedding]:
        """Yield one FileEmbedding per file, in completion order; bad files come back with an error.

        A folder stands for the audio files under it, found as `ingest` and `embed` find them
        (recursively, by extension); a folder that cannot be listed comes back as a failed entry.
        """
        files, unreadable = expand_folders(paths)
        for u in unreadable:
            yield FileEmbedding(u.path, u.path, "failed", u.reason)
        yield from self.run((p, p) for p in files)

    def embed_waveform(self, samples: np.ndarray, sample_rate: int) -> list[SegmentEmbedding]:
        """Embed an in-memory signal ([n] or [n, channels]) at any sample rate."""
        audio = to_model_audio(samples, sample_rate)
        if len(audio.samples) == 0:
            raise AudioDecodeError("the signal holds no samples to embed")
        return self.embed_audio(audio)

    def embed_audio(self, audio: Audio, on_segments: SegmentsDone | None = None) -> list[SegmentEmbedding]:
        """Embed decoded audio; `on_segments` follows its segments as they are embedded (see `run`)."""
        self._in_flight = None  # whatever an abandoned run left behind
        self._on_segments, self._known = on_segments, None
        decoded = Decoded(None, "<memory>", audio)
        job = _Job(decoded, self.hop_seconds)
        for _ in self._run_batches([(job, i, s) for i, s in job.add(decoded)]):
            pass
        for _ in self._collect():
            pass
        return job.result.segments

    def run(self, tasks: Iterable[tuple[object, str]], *, with_hash: bool = False,
            with_prints: bool = False, on_segments: SegmentsDone | None = None,
            known: KnownSegments | None = None) -> Iterator[FileEmbedding]:
        """Embed (key, path) tasks; the key comes back on each FileEmbedding (with its fingerprint if asked).

        `on_segments(file, new, done, total)` is called as a file's segments come out of the model,
        before the file is complete: a long file shows progress, and its finished segments can be kept
        (ingest commits them). `known(decoded)` returns segments already embedded for that file (by
        start time): they are not embedded again, so an interrupted long file resumes where it stopped.
        A long file reaches the model part by part as it decodes (decode_pool.PART_SAMPLES): memory
        stays bounded however long the files are. `total` is then an estimate until the file's end.
        """
        pending: list[tuple[_Job, int, Segment]] = []
        self._in_flight = None  # whatever an abandoned run left behind
        self._on_segments, self._known = on_segments, known
        jobs: dict[int, _Job] = {}  # files part-way through, by their number among the tasks
        # closed as soon as this generator is left, however: an interrupt must not leave decoders busy
        # until the traceback that holds this frame is freed
        pool = DecodePool(self.workers, with_hash=with_hash, nice=self.decode_nice, with_prints=with_prints)
        with closing(pool.map(tasks)) as decoded_parts:
            for decoded in decoded_parts:
                job = jobs.get(decoded.file) or self._job(decoded)
                jobs[decoded.file] = job
                pieces = job.add(decoded)
                if decoded.last:
                    del jobs[decoded.file]
                    if job.samples == 0 and not job.failed:
                        job.skip("holds no audio (0 samples)")
                        pieces = []
                if job.failed:  # damaged further in: what it had queued is not worth embedding
                    pending = [item for item in pending if item[0] is not job]
                if job.done:
                    yield job.result
                    continue
                pending.extend((job, i, s) for i, s in pieces)
                while len(pending) >= self.batch_size:
                    batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                    yield from self._run_batches(batch)
        yield from self._run_batches(pending)
        yield from self._collect()

    def _job(self, decoded: Decoded) -> _Job:
        """A file's job, made at its first part, with the segments embedded before (`known`) filled in."""
        job = _Job(decoded, self.hop_seconds)
        if decoded.audio is not None and self._known is not None:
            job.known = self._known(decoded)
        return job

    def _run_batches(self, items: list[tuple[_Job, int, Segment]]) -> Iterator[FileEmbedding]:
        """Queue each batch, then hand out the previous one's files (the device works meanwhile)."""
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            pending = self._launch([seg for _, _, seg in batch])
            yield from self._collect()
            self._in_flight = batch, pending

    def _collect(self) -> Iterator[FileEmbedding]:
        """Wait for the batch in flight, if any, and yield the files it completes."""
        if self._in_flight is None:
            return
        batch, pending = self._in_flight
        self._in_flight = None
        out = pending.result()
        self._slot_pending = [None if p is pending else p for p in self._slot_pending]
        touched: dict[int, tuple[_Job, list[SegmentEmbedding]]] = {}
        finished = []
        for row, (job, index, seg) in enumerate(batch):
            if job.failed:
                continue
            tokens = out.tokens[row].numpy() if out.tokens is not None else None
            emb = SegmentEmbedding(seg.start, seg.end, out.embeddings[row].numpy(), out.scores[row].numpy(), tokens)
            touched.setdefault(id(job), (job, []))[1].append(emb)
            if job.fill(index, emb):
                finished.append(job.result)
        if self._on_segments is not None:
            for job, new in touched.values():
                self._on_segments(job.result, new, *job.progress())
        yield from finished

    def _launch(self, segments: list[Segment]) -> PendingOutput:
        """Stage the batch in the next slot (free: its last batch has been collected) and queue it."""
        slot = self._next_slot
        waves, lengths = self._slots[slot]
        self._next_slot = (slot + 1) % len(self._slots)
        if self._slot_pending[slot] is not None:
            # Normally collected already; not when a run was abandoned with a batch in flight (or
            # closed mid-collect): its copy from this slot may still be queued, so wait for it.
            self._slot_pending[slot].result()
        n = len(segments)
        waves, lengths = waves[:n], lengths[:n]
        # Staged with numpy: one thread per copy. torch would split each copy across its intra-op
        # threads, and with decoders busy on the other cores every copy then waits for a
        # descheduled thread (~50 ms per batch of 64 on 2 cores).
        rows, sizes = waves.numpy(), lengths.numpy()
        for row, seg in enumerate(segments):
            size = len(seg.samples)
            rows[row, :size] = seg.samples
            rows[row, size:] = 0.0
            sizes[row] = max(size, MIN_SAMPLES)  # zero-padded to one frame (see MIN_SAMPLES)
        pending = self._slot_pending[slot] = self.model.launch(waves, lengths, tokens=self.tokens)
        return pending


class _Job:
    """A file on its way through the model: cuts its parts into segments as they arrive, and
    collects the segments' results until the last part is in and every segment is done."""

    def __init__(self, decoded: Decoded, hop_seconds: float):
        self.cutter = Cutter(hop_seconds)
        self.known: dict[tuple[float, float], SegmentEmbedding] = {}
        self.slots: list[SegmentEmbedding | None] = []
        self.remaining = 0  # segments cut and not yet embedded
        self.samples = 0
        self.complete = False  # the last part is in
        self.failed = False
        audio = decoded.audio
        self.expected = (segment_count(round(decoded.expected * SAMPLE_RATE), hop_seconds)
                         if decoded.expected else None)
        self.result = FileEmbedding(
            key=decoded.key,
            path=decoded.path,
            status="ok",
            sample_rate=audio.source_rate if audio else None,
            channels=audio.channels if audio else None,
            hash=decoded.hash,
        )

    def add(self, decoded: Decoded) -> list[tuple[int, Segment]]:
        """Cut the next part; returns the new segments still to embed, by their index in the file."""
        if decoded.audio is None:
            self.fail(decoded.error)
            return []
        samples = decoded.audio.samples
        self.samples += len(samples)
        pieces = self.cutter.feed(samples)
        if decoded.last:
            self.complete = True
            self.result.duration, self.result.prints = self.samples / SAMPLE_RATE, decoded.prints
            pieces += self.cutter.finish()
        todo = []
        for piece in pieces:
            index = len(self.slots)
            self.slots.append(None)
            self.remaining += 1
            if (emb := self.known.get((piece.start, piece.end))) is not None:
                self.fill(index, emb)
            else:
                todo.append((index, piece))
        if self.done:
            self.result.segments = list(self.slots)
        return todo

    def fail(self, error: str | None) -> None:
        self.failed = self.complete = True
        self.slots, self.remaining = [], 0
        self.result = FileEmbedding(self.result.key, self.result.path, "failed", error or "unknown error")

    def skip(self, reason: str) -> None:
        """Nothing to embed (a file of 0 samples); the one empty segment cut for it is dropped."""
        self.slots, self.remaining = [], 0
        self.result.status, self.result.error, self.result.segments = "skipped", reason, []

    @property
    def done(self) -> bool:
        return self.complete and self.remaining == 0

    def progress(self) -> tuple[int, int]:
        """(segments done, segments in the file): an estimate from the header until the last part is in."""
        done = len(self.slots) - self.remaining
        if self.complete:
            return done, len(self.slots)
        return done, max(self.expected or 0, len(self.slots) + 1)

    def fill(self, index: int, emb: SegmentEmbedding) -> bool:
        """Store one segment's result; True when the file is complete."""
        self.slots[index] = emb
        self.remaining -= 1
        if self.done:
            self.result.segments = list(self.slots)
        return self.done
