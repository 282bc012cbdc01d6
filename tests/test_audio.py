"""Decoding shortcuts must not change a single sample: the embeddings are the product."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audiosearch.audio import decode, decode_into, mixdown, resample, to_model_audio
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
    ("MP3", "MPEG_LAYER_III"),
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
