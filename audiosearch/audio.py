"""Decoding, mixing down, resampling and cutting audio into model segments.

Everything the model sees passes through here: any file libsndfile reads
(WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...) becomes mono float32 at the
model's rate, resampled with soxr's band-limited filter, then cut into
segments of `SEGMENT_SECONDS`. Files are decoded as streams (`open_stream`):
one block of the source in memory at a time, however long the file. MP3 goes
through FFmpeg (PyAV) for that: libsndfile's MP3 decoder glitches at the edges
of partial reads, and reading it whole took 2.7 GB for an hour of stereo.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .containers import FFMPEG_EXTENSIONS, ffmpeg_available, needs_ffmpeg, open_with_ffmpeg
from .errors import AudioDecodeError

SAMPLE_RATE = 16_000  # Hz, what AST was trained on
SEGMENT_SECONDS = 10.24  # 1024 frames of 10 ms: one AST input
SEGMENT_SAMPLES = round(SEGMENT_SECONDS * SAMPLE_RATE)  # 163840 samples
MIN_TAIL_SECONDS = 1.0  # a trailing segment shorter than this is dropped
MAX_SECONDS = 24 * 3600.0  # a header claiming more than a day is treated as corrupt

# Integer PCM is read as integers and scaled by `mixdown`: libsndfile's own conversion to
# float costs 6x the read (1.9 vs 0.3 ms per 10.24 s of 44.1 kHz stereo WAV). Its float
# is the integer times these powers of two, so the samples are bit-identical either way.
_READ_AS = {
    "PCM_S8": ("int16", 2.0**-15),
    "PCM_U8": ("int16", 2.0**-15),
    "PCM_16": ("int16", 2.0**-15),
    "PCM_24": ("int32", 2.0**-31),
    "PCM_32": ("int32", 2.0**-31),
}
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time: ~1.4 s at 44.1 kHz, 256 KiB of 16-bit stereo
_QUALITY = "HQ"  # soxr's band-limited resampling, for files (streamed) and signals (in one call) alike

AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aif .aiff .aifc .au .snd .caf .w64 .rf64 .sd2 .voc .wv".split()
)


@dataclass(frozen=True)
class Audio:
    """A decoded file: mono samples at `SAMPLE_RATE` plus what the file said of itself."""

    samples: np.ndarray  # float32 [n], mono, SAMPLE_RATE
    source_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class Segment:
    """One model input: `samples` cut from `start` seconds of a file."""

    start: float
    end: float
    samples: np.ndarray


def is_audio_path(path: Path) -> bool:
    """Audio by its name: what libsndfile reads, and the containers FFmpeg decodes (see containers.py)."""
    suffix = path.suffix.lower()
    return suffix in AUDIO_EXTENSIONS or suffix in FFMPEG_EXTENSIONS


def decode(path: str | Path) -> Audio:
    """Read any file libsndfile supports into mono float32 at SAMPLE_RATE.

    Raises AudioDecodeError with libsndfile's reason when the file is not
    readable audio, so callers can record it and move on. The content decides
    the format, not the extension (a FLAC named .mp3 decodes as FLAC). A
    truncated file libsndfile can still read (WAV, MP3) yields the audio it
    holds; a header claiming more than MAX_SECONDS is refused.
    """
    blocks: list[np.ndarray] = []
    rate, channels = decode_into(path, blocks.append)
    samples = np.concatenate(blocks) if len(blocks) > 1 else blocks[0] if blocks else np.empty(0, np.float32)
    return Audio(samples, rate, channels)


def decode_into(path: str | Path, write: Callable[[np.ndarray], object]) -> tuple[int, int]:
    """Decode `path` block by block, handing each block of model audio to `write`.

    Returns the file's own sample rate and channel count. Only one block of
    the source is in memory at a time, and it stays in the CPU's cache through
    reading, mixing down and resampling: ~1.5x faster than whole-file arrays,
    and the same samples, bit for bit (soxr streams exactly as it resamples in
    one shot). Raises AudioDecodeError as `decode` does.
    """
    with open_stream(path) as stream:
        for block in stream:
            write(block)
        return stream.source_rate, stream.channels


class AudioStream:
    """A file open for decoding: iterate it for blocks of mono float32 at SAMPLE_RATE, in order.

    Memory stays bounded by one block of the source whatever the file's length (a
    2-hour recording decodes in a few MiB), which is what `scan` and the decoders
    of long files rely on. `duration` is the header's estimate (None when the
    container does not say); the blocks themselves are the truth. Iterate once;
    close it (or use `with`) when stopping early. Errors, at opening or while
    decoding, are AudioDecodeError as for `decode`.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._file: sf.SoundFile | None = None
        self._container = None
        with _decode_errors(path):
            if needs_ffmpeg(path):
                if reason := why_unreadable(path):
                    raise AudioDecodeError(reason)
                self._container = open_with_ffmpeg(path)
                self.source_rate, self.channels = self._container.rate, self._container.channels
                self.duration = self._container.duration
            else:
                self._file = sf.SoundFile(self.path)
                try:
                    _check_header(self._file)
                except BaseException:
                    self._file.close()
                    raise
                self.source_rate, self.channels = self._file.samplerate, self._file.channels
                self.duration = self._file.frames / self.source_rate if self._file.frames else None
                if self._file.format == "MP3" and ffmpeg_available():
                    # libsndfile 1.2's MP3 decoder glitches at the edges of partial reads (jumps of up to
                    # 0.4 full scale, ulps elsewhere): FFmpeg's streams, within 3e-6 of libsndfile's one-shot read
                    self._file.close()
                    self._file, self._container = None, open_with_ffmpeg(path)

    def __iter__(self) -> Iterator[np.ndarray]:
        blocks = self._container_blocks() if self._container is not None else self._sndfile_blocks()
        with _decode_errors(self.path):
            yield from blocks

    def _sndfile_blocks(self) -> Iterator[np.ndarray]:
        f = self._file
        dtype, scale = _READ_AS.get(f.subtype, ("float32", 1.0))
        whole = f.format == "MP3"  # without FFmpeg: read in one call, as libsndfile reads MP3 right
        buffer = None if whole else np.empty((_BLOCK_FRAMES, self.channels), dtype=dtype)
        resampler = self._resampler()
        while True:
            block = f.read(-1 if whole else _BLOCK_FRAMES, dtype=dtype, always_2d=True, out=buffer)
            last = whole or len(block) < _BLOCK_FRAMES
            mono = _finite(mixdown(block, scale))
            out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
            if len(out):
                yield out
            if last:
                return

    def _container_blocks(self) -> Iterator[np.ndarray]:
        """AAC, WMA, WebM, ... through FFmpeg, then the same mixdown and soxr resampling as libsndfile's formats."""
        resampler = self._resampler()
        for block in self._container.blocks:
            mono = _finite(mixdown(block))
            out = mono if resampler is None else resampler.resample_chunk(mono)
            if len(out):
                yield out
        if resampler is not None and len(tail := resampler.resample_chunk(np.empty(0, np.float32), last=True)):
            yield tail

    def _resampler(self) -> soxr.ResampleStream | None:
        if self.source_rate == SAMPLE_RATE:
            return None
        return soxr.ResampleStream(self.source_rate, SAMPLE_RATE, 1, "float32", _QUALITY)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._container is not None:
            self._container.blocks.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(path: str | Path) -> AudioStream:
    """Open `path` for decoding in bounded memory (see AudioStream)."""
    return AudioStream(path)


@contextmanager
def _decode_errors(path: str | Path) -> Iterator[None]:
    """libsndfile's and the codecs' exceptions as one AudioDecodeError with a reason a user can act on."""
    try:
        yield
    except AudioDecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioDecodeError(why_unreadable(path) or f"not readable audio: {_reason(e)}") from e
    except MemoryError as e:
        raise AudioDecodeError("not enough memory to decode this file") from e


def to_model_audio(data: np.ndarray, sample_rate: int) -> Audio:
    """Mix down [n] or [n, channels] samples and resample them to SAMPLE_RATE."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim not in (1, 2) or data.ndim == 2 and data.shape[1] == 0:
        raise AudioDecodeError(f"expected samples shaped [n] or [n, channels], got {list(data.shape)}")
    channels = 1 if data.ndim == 1 else data.shape[1]
    return Audio(resample(_finite(mixdown(data)), sample_rate), sample_rate, channels)


def mixdown(data: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The mean of the channels of [n] or [n, channels] samples, times `scale`, as float32 [n].

    Summed column by column: numpy's `mean(axis=1)` over a few interleaved
    channels is 20x slower (6.5 ms per 10.24 s of 44.1 kHz stereo), and a BLAS
    matrix-vector product wakes OpenBLAS's thread pool, which then spins on
    every core (twice the CPU in each decoder). With a power-of-two `scale`
    the result is bit-identical to `mean` for up to 7 channels (numpy sums
    fewer than 8 values in order, as here).
    """
    if data.ndim == 1:
        data = data[:, None]
    channels = data.shape[1]
    x = data.astype(np.float32, copy=False)
    mono = x[:, 0].copy()
    for c in range(1, channels):
        mono += x[:, c]
    if channels > 1:
        mono /= np.float32(channels)
    if scale != 1.0:
        mono *= np.float32(scale)
    return mono


def _finite(mono: np.ndarray) -> np.ndarray:
    if not np.isfinite(mono).all():
        raise AudioDecodeError("audio holds NaN or infinite samples")
    return mono


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE or len(samples) == 0:
        return np.ascontiguousarray(samples, dtype=np.float32)
    return soxr.resample(samples, rate, SAMPLE_RATE, quality=_QUALITY).astype(np.float32, copy=False)


def segment(samples: np.ndarray, hop_seconds: float = SEGMENT_SECONDS) -> list[Segment]:
    """Cut a mono signal into SEGMENT_SECONDS windows every `hop_seconds`.

    A clip shorter than one segment is one (short) segment: the features pad
    it the way AST expects. A trailing window shorter than MIN_TAIL_SECONDS
    after a full one is dropped: it is mostly padding and its audio was heard
    by the window before when hop < segment length.
    """
    cutter = Cutter(hop_seconds)
    return cutter.feed(samples) + cutter.finish()


def segment_count(samples: int, hop_seconds: float = SEGMENT_SECONDS) -> int:
    """How many segments `segment` cuts from a signal of `samples` samples."""
    hop = max(1, round(hop_seconds * SAMPLE_RATE))
    if samples <= SEGMENT_SAMPLES:
        return 1
    full = (samples - SEGMENT_SAMPLES) // hop + 1  # windows that end inside the signal (or at its end)
    tail = full * hop  # where the first window past them would begin
    last_full_ends_at_end = (full - 1) * hop + SEGMENT_SAMPLES == samples
    return full + (not last_full_ends_at_end and samples - tail >= MIN_TAIL_SECONDS * SAMPLE_RATE)


class Cutter:
    """`segment` for a signal that arrives in pieces: the same segments, each as soon as its samples are in.

    A long file reaches the model part by part (decode_pool), so that only a few minutes of
    it are ever in memory. A segment within one piece is a view of it; only one that straddles
    two pieces is copied together from both.
    """

    def __init__(self, hop_seconds: float = SEGMENT_SECONDS):
        self.hop = max(1, round(hop_seconds * SAMPLE_RATE))
        self._held = np.empty(0, np.float32)  # the samples from _held_start on that later segments read
        self._held_start = 0
        self._next = 0  # where the next segment begins
        self._at_end = False  # the last segment cut ends where the signal so far ends

    def feed(self, samples: np.ndarray) -> list[Segment]:
        """The segments that `samples`, the next piece of the signal, complete."""
        if len(samples):
            self._at_end = False
        start = self._held_start + len(self._held)
        total = start + len(samples)
        out = []
        while self._next + SEGMENT_SAMPLES <= total:
            out.append(self._cut(self._next + SEGMENT_SAMPLES, samples, start))
        keep = min(self._next, total)
        if keep >= start:
            self._held = samples[keep - start:]
        else:  # the next segment begins in what was held: keep both (less than a segment)
            self._held = np.concatenate([self._held[keep - self._held_start:], samples])
        self._held_start = keep
        return out

    def finish(self) -> list[Segment]:
        """The trailing segments, by `segment`'s rules for the end of a signal."""
        n = self._held_start + len(self._held)
        empty = np.empty(0, np.float32)
        out = []
        while not self._at_end:
            end = min(self._next + SEGMENT_SAMPLES, n)
            if self._next > 0 and end - self._next < MIN_TAIL_SECONDS * SAMPLE_RATE:
                break
            out.append(self._cut(end, empty, n))
        self._held = empty
        return out

    def _cut(self, end: int, piece: np.ndarray, piece_start: int) -> Segment:
        """The segment from _next to `end`, read from the held samples, the new piece, or both."""
        begin = self._next
        held = self._held[begin - self._held_start:] if begin < piece_start else None
        if held is None:
            samples = piece[begin - piece_start : end - piece_start]
        elif end <= piece_start:
            samples = held[: end - begin]
        else:
            samples = np.concatenate([held, piece[: end - piece_start]])
        self._next += self.hop
        self._at_end = end == piece_start + len(piece)
        return Segment(begin / SAMPLE_RATE, end / SAMPLE_RATE, samples)


def _check_header(f: sf.SoundFile) -> None:
    if f.samplerate <= 0 or f.channels <= 0:
        raise AudioDecodeError(f"absurd header: {f.samplerate} Hz, {f.channels} channels")
    if f.frames < 0 or f.frames / f.samplerate > MAX_SECONDS:
        raise AudioDecodeError(f"absurd header: claims {f.frames} frames at {f.samplerate} Hz")


def file_format(path: str | Path) -> tuple[str | None, str | None]:
    """(container, sample encoding) from the header, as libsndfile names them ("FLAC", "PCM_24"; "MP3",
    "MPEG_LAYER_III"); for FFmpeg's formats the extension and no encoding. Picks which copy of a
    duplicate to keep (lossless over lossy, more bits); (None, None) when the header is unreadable."""
    if needs_ffmpeg(path):
        return Path(path).suffix.lstrip(".").upper() or None, None
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None, None
    return info.format or None, info.subtype or None


def why_unreadable(path: str | Path) -> str | None:
    """A plainer reason than libsndfile's for the common cases: an empty file, a broken link, no permission."""
    path = str(path)
    try:
        if os.stat(path).st_size == 0:
            return "an empty file (0 bytes)"
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symlink (it points to {os.readlink(path)}, which does not exist)"
        return None
    except OSError:  # a symlink loop, a permission error on the way: the OS's own words are clear
        return None
    if not os.access(path, os.R_OK):
        return "not readable: permission denied"
    return None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
