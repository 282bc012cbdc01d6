"""Decoding shortcuts must not change a single sample: the embeddings are the product."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audiosearch.audio import (MIN_TAIL_SECONDS, SAMPLE_RATE, SEGMENT_SAMPLES, SEGMENT_SECONDS, Cutter, decode,
                              decode_into, mixdown, open_stream, resample, segment, segment_count, to_model_audio)
from audiosearch.errors import AudioDecodeError

SUBTYPES = [
    ("WAV", "PCM_U8"),
    ("WAV", "PCM_16"),
    ("WAV", "PCM_24"),
    ("WAV", "PCM_32"),
    ("WAV", "FLOAT"),
    ("FLAC", "PCM_S8"),
    ("FLAC", "PCM_16"),
    ("FLAC", "PCM_24"),
    ("AIFF", "PCM_16"),
    ("OGG", "VORBIS"),
    ("OGG", "OPUS"),
    ("CAF", "ALAC_16"),
]


def _write(path, fmt: str, subtype: str, channels: int, rate: int) -> None:
    """4 s: longer than one block of decoding at any rate a test uses."""
    rng = np.random.default_rng(channels)
    x = rng.uniform(-1, 1, (rate * 4, channels))
    x[:8], x[8:16] = 1.0, -1.0  # full scale both ways
    sf.write(path, x, rate, format=fmt, subtype=subtype)


@pytest.mark.parametrize("fmt,subtype", SUBTYPES)
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_is_bit_identical_to_libsndfile_float(tmp_path, fmt, subtype, channels) -> None:
    """Integer PCM is read as integers and scaled by us; the floats must be libsndfile's own."""
    path = tmp_path / f"x.{fmt.lower()}"
    _write(path, fmt, subtype, channels, 48000 if subtype == "OPUS" else 22050)
    with sf.SoundFile(path) as f:  # not sf.read: its seek to 0 moves MP3 samples by an ulp
        floats, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    expected = resample(floats.mean(axis=1, dtype=np.float32), rate)
    audio = decode(path)
    assert audio.channels == channels and audio.source_rate == rate
    np.testing.assert_array_equal(audio.samples, expected)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 44100, 96000])
@pytest.mark.parametrize("frames", [1, 399, 1 << 16, (1 << 16) + 1, 200_000])
def test_block_by_block_decoding_equals_one_shot_resampling(tmp_path, rate, frames) -> None:
    """Files are decoded in blocks through a soxr stream; in memory, resampled in one call."""
    x = np.random.default_rng(frames).uniform(-0.9, 0.9, frames).astype(np.float32)
    path = tmp_path / "x.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    audio = decode(path)
    assert audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, to_model_audio(x, rate).samples)


def test_decoding_into_a_writer_hands_over_blocks(tmp_path) -> None:
    path = tmp_path / "x.flac"
    _write(path, "FLAC", "PCM_16", 2, 48000)
    blocks = []
    assert decode_into(path, blocks.append) == (48000, 2)
    assert len(blocks) >= 1
    np.testing.assert_array_equal(np.concatenate(blocks), decode(path).samples)


def test_nan_anywhere_in_a_float_file_is_refused(tmp_path) -> None:
    x = np.zeros(300_000, np.float32)
    x[250_000] = np.nan  # past the first block
    path = tmp_path / "x.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN"):
        decode(path)


@pytest.mark.parametrize("channels", [3, 6])
def test_mixdown_of_many_channels_is_their_mean(channels) -> None:
    x = np.random.default_rng(0).standard_normal((1000, channels)).astype(np.float32)
    np.testing.assert_array_equal(mixdown(x), x.mean(axis=1, dtype=np.float32))
    assert mixdown(x).dtype == np.float32 and mixdown(x).flags.c_contiguous


def test_mono_input_is_kept_as_is() -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(mixdown(x), x)
    np.testing.assert_array_equal(mixdown(x[:, None]), x)


@pytest.mark.parametrize("shape", [(100, 0), (2, 3, 4), ()])
def test_signals_without_channels_are_refused(shape) -> None:
    with pytest.raises(AudioDecodeError, match="expected samples shaped"):
        to_model_audio(np.zeros(shape, np.float32), 16000)


def test_waveforms_in_memory_go_the_same_way_as_files(tmp_path) -> None:
    path = tmp_path / "x.wav"
    _write(path, "WAV", "FLOAT", 2, 44100)
    floats, rate = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(to_model_audio(floats, rate).samples, decode(path).samples)


@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 1), (24000, 1), (44100, 2)])
def test_mp3_streams_without_glitches(tmp_path, rate, channels) -> None:
    """MP3 is decoded block by block (FFmpeg: libsndfile's partial reads jump by up to 0.4 at their edges);
    the samples stay within 1e-5 of libsndfile's one-shot read, with the same length and alignment."""
    path = tmp_path / "x.mp3"
    t = np.arange(rate * 7) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t * (1 + t / 7)) + 0.1 * np.random.default_rng(0).standard_normal(len(t))
    sf.write(path, np.stack([x] * channels, axis=1), rate, format="MP3")
    with sf.SoundFile(path) as f:
        floats = f.read(dtype="float32", always_2d=True)
    expected = resample(floats.mean(axis=1, dtype=np.float32), rate)
    with open_stream(path) as stream:
        blocks = list(stream)
        assert (stream.source_rate, stream.channels) == (rate, channels)
        assert stream.duration == pytest.approx(7, abs=0.05)
    assert len(blocks) > 1
    samples = np.concatenate(blocks)
    assert len(samples) == len(expected)
    assert np.abs(samples - expected).max() < 1e-5


# VmHWM, the peak of this process's own memory: ru_maxrss would start from the forking parent's
LONG_DECODE = """
import re, sys
from audiosearch.audio import open_stream
n = 0
with open_stream(sys.argv[1]) as stream:
    for block in stream:
        n += len(block)
print(n, re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


@pytest.mark.parametrize("fmt,long", [("MP3", 6), ("FLAC", 20)])  # MP3: encoding costs 5 s a minute
def test_decoding_a_long_file_takes_no_more_memory_than_a_short_one(tmp_path, fmt, long) -> None:
    """Peak RSS of streaming `long` minutes of 44.1 kHz stereo is within 30 MB of streaming 1 minute
    (a one-shot read of 6 minutes alone would hold 127 MB of float32)."""
    import subprocess
    import sys

    rate, peaks = 44100, []
    for minutes in (1, long):
        path = tmp_path / f"{minutes}.{fmt.lower()}"
        with sf.SoundFile(path, "w", rate, 2, format=fmt) as f:
            block = (0.3 * np.random.default_rng(minutes).standard_normal((rate * 60, 2))).astype(np.float32)
            for _ in range(minutes):
                f.write(block)
        p = subprocess.run([sys.executable, "-c", LONG_DECODE, str(path)], capture_output=True, text=True, check=True)
        samples, kib = map(int, p.stdout.split())
        assert samples == pytest.approx(minutes * 60 * 16000, abs=2000)
        peaks.append(kib / 1024)
    assert peaks[1] - peaks[0] < 30, peaks


def test_the_fingerprint_spectrum_in_blocks_is_the_one_piece_spectrum(monkeypatch) -> None:
    """Long files are fingerprinted SPECTRUM_FRAMES at a time: the same peaks as in one piece."""
    from audiosearch import synthetic as syn
    from audiosearch.match import fingerprint as F

    x = np.concatenate([syn.melody(40, seed=1), syn.bursts(20, seed=2)])
    monkeypatch.setattr(F, "SPECTRUM_FRAMES", 700)  # 60 s at 32 ms a frame: 3 blocks
    blocks = F.fingerprint(x)
    monkeypatch.setattr(F, "SPECTRUM_FRAMES", 10**9)
    whole = F.fingerprint(x)
    assert len(whole) > 500
    for name in ("times", "bands", "strengths"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))


def _reference_segments(samples: np.ndarray, hop_seconds: float) -> list[tuple[float, float, np.ndarray]]:
    """`segment`'s rules written out plainly, on the whole signal."""
    hop, n, out = max(1, round(hop_seconds * SAMPLE_RATE)), len(samples), []
    for begin in range(0, max(n, 1), hop):
        end = min(begin + SEGMENT_SAMPLES, n)
        if begin > 0 and end - begin < MIN_TAIL_SECONDS * SAMPLE_RATE:
            break
        out.append((begin / SAMPLE_RATE, end / SAMPLE_RATE, samples[begin:end]))
        if end == n:
            break
    return out


def test_a_signal_cut_as_it_arrives_gives_the_segments_of_the_whole():
    """A long file reaches the model in parts: each piece size, hop and length must cut as the whole does."""
    rng = np.random.default_rng(0)
    lengths = [0, 1, 399, SEGMENT_SAMPLES - 1, SEGMENT_SAMPLES, SEGMENT_SAMPLES + 15_999, SEGMENT_SAMPLES + 16_000,
               2 * SEGMENT_SAMPLES]
    for trial in range(400):
        n = lengths[trial] if trial < len(lengths) else int(rng.integers(0, 6 * SEGMENT_SAMPLES))
        hop = float(rng.choice([SEGMENT_SECONDS, 5.12, 1.0, 3.3, 12.0]))
        x = rng.standard_normal(n).astype(np.float32)
        cutter, got, i = Cutter(hop), [], 0
        while i < n:
            k = int(rng.choice([1, 1000, SEGMENT_SAMPLES, 3 * SEGMENT_SAMPLES + 7, int(rng.integers(1, 400_000))]))
            got += cutter.feed(np.empty(0, np.float32)) + cutter.feed(x[i:i + k])
            i += k
        got += cutter.finish()
        want = _reference_segments(x, hop)
        assert [(s.start, s.end) for s in got] == [(a, b) for a, b, _ in want], (n, hop)
        for s, (_, _, samples) in zip(got, want):
            np.testing.assert_array_equal(s.samples, samples)
        assert segment_count(n, hop) == len(want) == len(segment(x, hop))


FAKE_FFPROBE = """#!/bin/sh
echo '{"streams": [{"sample_rate": "16000", "channels": 1, "duration": "1.0"}]}'
"""
# Complains about every frame of a damaged file (256 KiB of messages, more than a pipe holds)
# before it writes its audio: one second of a 440 Hz tone.
FAKE_FFMPEG = """#!{python}
import sys
import numpy as np
sys.stderr.write("[mp3float @ 0x1] Header missing\\n" * 8000)
sys.stderr.flush()
sys.stdout.buffer.write(np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype("<f4").tobytes())
"""


def test_the_ffmpeg_command_may_say_more_than_a_pipe_holds(tmp_path, monkeypatch, without_pyav) -> None:
    """Without PyAV, audio comes from the ffmpeg command: its messages must never block its audio."""
    import sys
    import threading

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("ffprobe", FAKE_FFPROBE), ("ffmpeg", FAKE_FFMPEG.format(python=sys.executable))):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    clip = tmp_path / "damaged.m4a"
    clip.write_bytes(b"not read by the fake ffmpeg")
    decoded = []
    worker = threading.Thread(target=lambda: decoded.append(decode(clip)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "decoding hung: ffmpeg's messages filled their pipe"
    assert decoded[0].samples.shape == (16000,)
    assert np.abs(decoded[0].samples).max() == pytest.approx(1.0, abs=1e-3)
