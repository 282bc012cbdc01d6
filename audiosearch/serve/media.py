"""Library audio as a browser wants it: byte ranges, WAV for what it cannot play, waveform peaks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE

# What Chromium and Firefox play natively, by extension, with the type to send. Everything else
# the decoder reads (AIFF, CAF, W64, WavPack, WMA, AC3, AMR, ...) is sent as a WAV transcode.
BROWSER_TYPES = {
    ".wav": "audio/wav", ".wave": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg",
    ".opus": "audio/ogg", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "audio/mp4", ".aac": "audio/aac",
    ".webm": "audio/webm",
}
CHUNK_BYTES = 1 << 18  # read and sent at a time


def browser_type(path: str | Path) -> str | None:
    """The media type to send the file as, or None when a browser cannot play it as it is."""
    return BROWSER_TYPES.get(Path(path).suffix.lower())


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range


class RangeNotSatisfiable(Exception):
    """A Range header that asks for bytes the file does not have (HTTP 416)."""


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a `Range` header asks for, None for the whole file.

    Browsers seeking an <audio> element send one range (`bytes=N-`); a header that is
    malformed or asks for several ranges is ignored (the whole file, as RFC 9110 allows).
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable
    return ByteRange(start, end)


class OpenFile:
    """A file descriptor that closes once, whoever closes it first (the body's end, or the response's)."""

    def __init__(self, fd: int, size: int, media_type: str, transcoded: bool = False):
        self.fd, self.size, self.media_type, self.transcoded = fd, size, media_type, transcoded
        self._open = True

    def read_range(self, start: int, end: int):
        """Yield the bytes start..end (inclusive) in chunks, then close."""
        try:
            offset = start
            while offset <= end:
                data = os.pread(self.fd, min(CHUNK_BYTES, end - offset + 1), offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV of mono float samples, written to a temporary name and renamed into place."""
    import soundfile as sf

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def peaks(samples: np.ndarray, bins: int) -> list[float]:
    """The loudest absolute sample in each of `bins` equal slices: a waveform thumbnail."""
    if len(samples) == 0:
        return [0.0] * bins
    edges = np.linspace(0, len(samples), bins + 1).astype(np.int64)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        out.append(float(np.abs(samples[a:max(b, a + 1)]).max()) if a < len(samples) else 0.0)
    return [round(v, 4) for v in out]
