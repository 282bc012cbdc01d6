"""Audio that libsndfile cannot read (AAC, M4A, WMA, MP4, WebM, ...), decoded through FFmpeg.

PyAV (FFmpeg's libraries, `pip install av`) is used when it is installed,
else the `ffmpeg` command when it is on PATH. Either way the decoded audio
goes through the same mixdown and soxr resampling as every other file, so a
re-encode of a file embeds like the file. With neither, decoding fails with a
message that says what to install.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AudioDecodeError

FFMPEG_EXTENSIONS = frozenset(".aac .m4a .m4b .mp4 .m4v .mov .3gp .wma .asf .webm .mka .mkv .ac3 .amr".split())
_PIPE_BYTES = 1 << 18  # float32 read from the ffmpeg command at a time: 64k samples


@dataclass
class Opened:
    """A container open for decoding: its first audio stream's rate, channels, estimated duration, and
    a generator of float32 [n, channels] blocks at that rate (close it to stop early)."""

    rate: int
    channels: int
    duration: float | None
    blocks: Generator[np.ndarray, None, None]


def needs_ffmpeg(path: str | Path) -> bool:
    return Path(path).suffix.lower() in FFMPEG_EXTENSIONS


def ffmpeg_available() -> bool:
    """PyAV is installed, or the ffmpeg command is on PATH."""
    return importlib.util.find_spec("av") is not None or bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))


def open_with_ffmpeg(path: str | Path) -> Opened:
    """Open the file's first audio stream; its blocks come one at a time, never the whole file."""
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        return _open_av(av, path)
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        return _open_command(path)
    kind = Path(path).suffix.lstrip(".").upper() or "this format"
    raise AudioDecodeError(f"needs ffmpeg to decode {kind} (apt install ffmpeg, or pip install av)")


def _open_av(av, path: str | Path) -> Opened:
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, ValueError) as e:
        raise AudioDecodeError(f"not readable audio: {e}") from e
    try:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise AudioDecodeError("not readable audio: the file holds no audio stream")
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        if not rate or not channels:
            raise AudioDecodeError(f"absurd header: {rate} Hz, {channels} channels")
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / av.time_base
    except BaseException:
        container.close()
        raise
    return Opened(rate, channels, duration, _av_blocks(av, container, stream, rate))


def _av_blocks(av, container, stream, rate: int) -> Generator[np.ndarray, None, None]:
    try:
        # planar float at the source rate and layout: mixing down and resampling stay ours
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                yield out.to_ndarray().T
        for out in resampler.resample(None):
            yield out.to_ndarray().T
    except (av.error.FFmpegError, ValueError) as e:
        raise AudioDecodeError(f"not readable audio: {e}") from e
    finally:
        container.close()


def _open_command(path: str | Path) -> Opened:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels,duration",
         "-of", "json", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    streams = json.loads(probe.stdout or "{}").get("streams") if probe.returncode == 0 else None
    if not streams:
        raise AudioDecodeError(f"not readable audio: {(probe.stderr.strip().splitlines() or ['no audio stream'])[-1]}")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    try:
        duration = float(streams[0]["duration"])
    except (KeyError, ValueError):
        duration = None
    return Opened(rate, channels, duration, _command_blocks(path, channels))


def _command_blocks(path: str | Path, channels: int) -> Generator[np.ndarray, None, None]:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-"]
    # Its messages go to a file, not a pipe: a damaged file can make ffmpeg write more than a pipe
    # holds (64 KiB) before it writes the audio, and then both sides would wait for ever.
    with tempfile.TemporaryFile() as messages, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=messages) as proc:
        try:
            frame = 4 * channels
            rest = b""
            while chunk := proc.stdout.read(_PIPE_BYTES):
                data, rest = rest + chunk, b""
                cut = len(data) - len(data) % frame
                data, rest = data[:cut], data[cut:]
                if data:
                    yield np.frombuffer(data, dtype="<f4").reshape(-1, channels)
            proc.wait()
            error = _tail(messages)
        finally:
            if proc.poll() is None:  # stopped early: the rest is not wanted
                proc.kill()
    if proc.returncode != 0:
        raise AudioDecodeError(f"not readable audio: {(error.splitlines() or ['ffmpeg failed'])[-1]}")


def _tail(messages, size: int = 4096) -> str:
    """The end of ffmpeg's messages (its last line says why it failed)."""
    messages.seek(0, 2)
    messages.seek(max(0, messages.tell() - size))
    return messages.read().decode(errors="replace").strip()
