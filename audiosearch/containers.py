"""Audio that libsndfile cannot read (AAC, M4A, WMA, MP4, WebM, ...), decoded through FFmpeg.

PyAV (FFmpeg's libraries, `pip install av`) is used when it is installed,
else the `ffmpeg` command when it is on PATH. Either way the decoded audio
goes through the same mixdown and soxr resampling as every other file, so a
re-encode of a file embeds like the file. With neither, decoding fails with a
message that says what to install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import AudioDecodeError

FFMPEG_EXTENSIONS = frozenset(".aac .m4a .m4b .mp4 .m4v .mov .3gp .wma .asf .webm .mka .mkv .ac3 .amr".split())
_PIPE_BYTES = 1 << 18  # float32 read from the ffmpeg command at a time: 64k samples

Sink = Callable[[np.ndarray, int], None]  # (float32 [n, channels] at the source rate, source rate)


def needs_ffmpeg(path: str | Path) -> bool:
    return Path(path).suffix.lower() in FFMPEG_EXTENSIONS


def decode_with_ffmpeg(path: str | Path, sink: Sink) -> tuple[int, int]:
    """Hand the file's first audio stream to `sink` block by block; returns (source rate, channels)."""
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        return _decode_av(av, path, sink)
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        return _decode_command(path, sink)
    kind = Path(path).suffix.lstrip(".").upper() or "this format"
    raise AudioDecodeError(f"needs ffmpeg to decode {kind} (apt install ffmpeg, or pip install av)")


def _decode_av(av, path: str | Path, sink: Sink) -> tuple[int, int]:
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioDecodeError("not readable audio: the file holds no audio stream")
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            if not rate or not channels:
                raise AudioDecodeError(f"absurd header: {rate} Hz, {channels} channels")
            # planar float at the source rate and layout: mixing down and resampling stay ours
            resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    sink(out.to_ndarray().T, rate)
            for out in resampler.resample(None):
                sink(out.to_ndarray().T, rate)
            return rate, channels
    except AudioDecodeError:
        raise
    except (av.error.FFmpegError, ValueError) as e:
        raise AudioDecodeError(f"not readable audio: {e}") from e


def _decode_command(path: str | Path, sink: Sink) -> tuple[int, int]:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels",
         "-of", "json", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    streams = json.loads(probe.stdout or "{}").get("streams") if probe.returncode == 0 else None
    if not streams:
        raise AudioDecodeError(f"not readable audio: {(probe.stderr.strip().splitlines() or ['no audio stream'])[-1]}")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        frame = 4 * channels
        rest = b""
        while chunk := proc.stdout.read(_PIPE_BYTES):
            data, rest = rest + chunk, b""
            cut = len(data) - len(data) % frame
            data, rest = data[:cut], data[cut:]
            if data:
                sink(np.frombuffer(data, dtype="<f4").reshape(-1, channels), rate)
        error = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise AudioDecodeError(f"not readable audio: {(error.splitlines() or ['ffmpeg failed'])[-1]}")
    return rate, channels
