"""The edits a query goes through, each a function of (excerpt, output, strength) returning its ground truth.

An excerpt is cut from a library file first (sox trim), then edited. The truth is given in the
issue's terms: `speed` = how much faster the query plays than the library audio (sox `speed 1.05`
-> speed 1.05 and pitch 1.05; `tempo 1.05` -> speed 1.05, pitch 1.0; `pitch 200` -> speed 1.0,
pitch 2**(200/1200)), and `query_start` = where the library audio starts inside the query.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .tools import run


@dataclass(frozen=True)
class Truth:
    speed: float = 1.0
    pitch: float = 1.0
    query_start: float = 0.0  # seconds of other audio (silence) before the library audio in the query


Edit = Callable[[Path, Path, str, random.Random, dict], Truth]


def _sox(*effects: str) -> Edit:
    def edit(src: Path, out: Path, strength: str, rng: random.Random, bg: dict) -> Truth:
        run(["sox", str(src), "-b", "16", str(out), *[e.format(s=strength) for e in effects]])
        return Truth()
    return edit


def copy(src, out, strength, rng, bg) -> Truth:
    run(["sox", str(src), "-b", "16", str(out)])
    return Truth()


def codec(fmt: str) -> Edit:
    """Encode with ffmpeg at `strength` (a bitrate such as 64k), decode back to 16-bit WAV."""
    codec_args = {"mp3": ["-c:a", "libmp3lame"], "opus": ["-c:a", "libopus"], "m4a": ["-c:a", "aac"]}[fmt]

    def edit(src: Path, out: Path, strength: str, rng: random.Random, bg: dict) -> Truth:
        with tempfile.TemporaryDirectory() as tmp:
            enc = Path(tmp) / f"q.{fmt}"
            run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), *codec_args, "-b:a", strength, str(enc)])
            run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(enc), "-c:a", "pcm_s16le", str(out)])
        return Truth()
    return edit


def gsm(src, out, strength, rng, bg) -> Truth:
    """GSM 06.10 full rate (13 kbit/s, 8 kHz mono) through sox, back to WAV."""
    with tempfile.TemporaryDirectory() as tmp:
        enc = Path(tmp) / "q.gsm"
        run(["sox", str(src), "-r", "8000", "-c", "1", str(enc)])
        run(["sox", str(enc), "-b", "16", str(out)])
    return Truth()


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    y, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return y.mean(axis=1), rate


def _write(path: Path, y: np.ndarray, rate: int) -> None:
    sf.write(str(path), np.clip(y, -1.0, 1.0), rate, subtype="PCM_16")


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spec / np.sqrt(f), n)


def _snr_mix(y: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """y + noise scaled so that rms(y) / rms(noise) is `snr_db` (rms over the whole excerpt)."""
    ry = float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) or 1e-4
    rn = float(np.sqrt(np.mean(noise ** 2))) or 1.0
    return (y + noise * (ry / rn) * 10 ** (-snr_db / 20)).astype(np.float32)


def noise(color: str) -> Edit:
    def edit(src: Path, out: Path, strength: str, rng: random.Random, bg: dict) -> Truth:
        y, rate = _read_mono(src)
        g = np.random.default_rng(rng.getrandbits(32))
        n = g.standard_normal(len(y)) if color == "white" else _pink(len(y), g)
        _write(out, _snr_mix(y, n, float(strength.split()[0])), rate)
        return Truth()
    return edit


def mixed(background: str) -> Edit:
    """Mix in a stretch of background audio (music or babble that is not in the library)."""
    def edit(src: Path, out: Path, strength: str, rng: random.Random, bg: dict) -> Truth:
        y, rate = _read_mono(src)
        b, brate = bg[background]
        if brate != rate:
            b = soxr.resample(b, brate, rate)
        start = rng.randint(0, max(0, len(b) - len(y) - 1))
        seg = np.resize(b[start:start + len(y)], len(y)).astype(np.float64)
        _write(out, _snr_mix(y, seg, float(strength.split()[0])), rate)
        return Truth()
    return edit


def shift(src, out, strength, rng, bg) -> Truth:
    """The library audio starts `strength` seconds into the query (silence before it)."""
    pad = float(strength.split()[0])
    run(["sox", str(src), "-b", "16", str(out), "pad", f"{pad}", "0"])
    return Truth(query_start=pad)


def telephone(src, out, strength, rng, bg) -> Truth:
    run(["sox", str(src), "-b", "16", str(out), "sinc", strength.split()[0], "rate", "8k"])
    return Truth()


def speed(src, out, strength, rng, bg) -> Truth:
    f = float(strength.lstrip("×"))
    run(["sox", str(src), "-b", "16", str(out), "speed", f"{f}"])
    return Truth(speed=f, pitch=f)


def tempo(src, out, strength, rng, bg) -> Truth:
    f = float(strength.lstrip("×"))
    run(["sox", str(src), "-b", "16", str(out), "tempo", f"{f}"])
    return Truth(speed=f)


def pitch(src, out, strength, rng, bg) -> Truth:
    cents = float(strength.split()[0])
    run(["sox", str(src), "-b", "16", str(out), "pitch", f"{cents:+.0f}"])
    return Truth(pitch=2 ** (cents / 1200))


EDITS: dict[str, Edit] = {
    "copy": copy, "mp3": codec("mp3"), "opus": codec("opus"), "aac": codec("m4a"), "gsm": gsm,
    "gain": _sox("gain", "{s}"), "white noise": noise("white"), "pink noise": noise("pink"),
    "music mixed": mixed("music"), "babble mixed": mixed("babble"), "shift": shift, "telephone": telephone,
    "reverb": _sox("reverb", "{s}"), "speed": speed, "tempo": tempo, "pitch": pitch, "excerpt": copy,
}
