"""LogMel must reproduce transformers.ASTFeatureExtractor, clip for clip, in one batched call."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor

from audiosearch.logmel import FeatureConfig, LogMel

SR = 16000
F32_TOL = 2e-3
F64_TOL = 1e-6


def _time(n: int) -> np.ndarray:
    return np.arange(n) / SR


def _sine(n: int, hz: float) -> np.ndarray:
    return np.sin(2 * np.pi * hz * _time(n))


def _chirp(n: int) -> np.ndarray:
    t = _time(n)
    sweep = (7500.0 - 30.0) / (2 * max(t[-1], 1.0 / SR))
    return np.sin(2 * np.pi * (30.0 * t + sweep * t**2))


def _noise(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal(n)


def _impulses(n: int) -> np.ndarray:
    x = np.zeros(n)
    x[::800] = 1.0
    return x


SIGNALS: dict[str, Callable[[int], np.ndarray]] = {
    "sine_440_loud": lambda n: 0.99 * _sine(n, 440.0),
    "sine_1k_quiet": lambda n: 1e-3 * _sine(n, 1000.0),
    "sine_50hz_rumble": lambda n: 0.8 * _sine(n, 50.0),
    "chord": lambda n: (_sine(n, 261.63) + _sine(n, 329.63) + _sine(n, 392.0)) / 3,
    "white_noise": lambda n: 0.3 * _noise(n),
    "white_noise_quiet": lambda n: 1e-4 * _noise(n),
    "clipped_noise": lambda n: np.clip(_noise(n), -1.0, 1.0),
    "silence": lambda n: np.zeros(n),
    "impulse_train": _impulses,
    "chirp_full_scale": _chirp,
    "dc_offset_tone": lambda n: 0.5 + 0.05 * _sine(n, 3000.0),
    "sine_7khz": lambda n: 0.5 * _sine(n, 7000.0),
}

# (signal, length in samples): 0.5 s, 5 s, 10.24 s (exactly max_length frames), 30 s, tiny.
CASES = [
    ("sine_440_loud", 80_000),
    ("sine_1k_quiet", 163_840),
    ("sine_50hz_rumble", 8_000),
    ("chord", 163_840),
    ("white_noise", 480_000),
    ("white_noise_quiet", 80_000),
    ("clipped_noise", 8_000),
    ("silence", 80_000),
    ("impulse_train", 163_840),
    ("chirp_full_scale", 163_840),
    ("chirp_full_scale", 8_000),
    ("dc_offset_tone", 80_000),
    ("sine_7khz", 480_000),
    ("white_noise", 100),
    ("white_noise", 399),
    ("chord", 400),
    ("chirp_full_scale", 401),
    ("silence", 401),
]
CASE_IDS = [f"{name}-{n}" for name, n in CASES]


def make_clip(name: str, n: int) -> np.ndarray:
    return SIGNALS[name](n).astype(np.float32)


def extract(extractor: ASTFeatureExtractor, clip: np.ndarray) -> np.ndarray:
    """The extractor's features for one clip; [max_length, mel]."""
    return extractor(clip, sampling_rate=SR, return_tensors="np")["input_values"][0]


def all_padding(config: FeatureConfig) -> np.ndarray:
    """What a clip with no whole frame becomes: zeros in the log domain, then normalised."""
    value = -config.mean / (2 * config.std) if config.do_normalize else 0.0
    return np.full((config.max_length, config.num_mel_bins), value)


def expected(extractor: ASTFeatureExtractor, clip: np.ndarray) -> np.ndarray:
    """Extractor output; clips under 240 samples make it raise, so ours is all padding there."""
    if clip.size < 240:
        return all_padding(FeatureConfig.from_extractor(extractor))
    return extract(extractor, clip)


def run(module: LogMel, clips: list[np.ndarray]) -> np.ndarray:
    """One batched call on right-zero-padded clips."""
    width = max(clip.size for clip in clips)
    batch = np.zeros((len(clips), width), dtype=np.float32)
    for row, clip in zip(batch, clips):
        row[: clip.size] = clip
    lengths = torch.tensor([clip.size for clip in clips], dtype=torch.int64)
    return module(torch.from_numpy(batch), lengths).numpy()


@pytest.fixture(scope="module")
def extractor() -> ASTFeatureExtractor:
    with warnings.catch_warnings():  # the default bank has one empty mel filter; it warns about it
        warnings.simplefilter("ignore", UserWarning)
        return ASTFeatureExtractor()


@pytest.fixture(scope="module")
def references(extractor: ASTFeatureExtractor) -> dict[tuple[str, int], np.ndarray]:
    return {case: expected(extractor, make_clip(*case)) for case in CASES}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, F32_TOL), (torch.float64, F64_TOL)])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_single_clip_matches_extractor(case, dtype, tol, references) -> None:
    out = run(LogMel(FeatureConfig(), dtype), [make_clip(*case)])
    assert out.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    np.testing.assert_allclose(out[0], references[case], rtol=0, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, F32_TOL), (torch.float64, F64_TOL)])
def test_mixed_length_batch_matches_extractor(dtype, tol, references) -> None:
    out = run(LogMel(FeatureConfig(), dtype), [make_clip(*case) for case in CASES])
    assert out.shape == (len(CASES), 1024, 128)
    for row, case in zip(out, CASES):
        np.testing.assert_allclose(row, references[case], rtol=0, atol=tol, err_msg=str(case))


def test_extractor_quirks_under_one_frame(extractor) -> None:
    """Under 400 samples there is no frame: 240..399 gives all padding, fewer raises (numpy path)."""
    config = FeatureConfig()
    np.testing.assert_allclose(extract(extractor, make_clip("white_noise", 399)), all_padding(config), atol=1e-6)
    with pytest.raises(ValueError):
        extract(extractor, make_clip("white_noise", 100))
    out = run(LogMel(config), [make_clip("white_noise", 100), np.zeros(0, dtype=np.float32)])
    np.testing.assert_allclose(out, np.stack([all_padding(config)] * 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_mel_bins": 64, "mean": -3.0, "std": 2.0}, {"max_length": 256, "do_normalize": False}],
    ids=["mel64-mean-std", "len256-raw"],
)
def test_from_extractor_matches_that_extractor(kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        custom = ASTFeatureExtractor(**kwargs)
    config = FeatureConfig.from_extractor(custom)
    for key, value in kwargs.items():
        assert getattr(config, key) == value
    clips = [make_clip("chord", 80_000), make_clip("chirp_full_scale", 8_000), make_clip("silence", 401)]
    out = run(LogMel(config), clips)
    tol = F32_TOL if config.do_normalize else F32_TOL * 2 * config.std  # same bound, raw log-mel units
    for row, clip in zip(out, clips):
        np.testing.assert_allclose(row, extract(custom, clip), rtol=0, atol=tol)


def test_custom_max_length_shape_and_truncation() -> None:
    config = FeatureConfig(max_length=256)
    assert config.max_samples == 400 + 160 * 255
    module = LogMel(config)
    noise = make_clip("white_noise", 80_000)
    out = run(module, [noise, make_clip("chord", 16_000), make_clip("silence", 300)])
    assert out.shape == (3, 256, 128)
    head_only = run(module, [noise[: config.max_samples]])
    np.testing.assert_allclose(out[0], head_only[0], rtol=0, atol=1e-6)  # later samples never matter
    assert module.double().dtype == torch.float64


def test_reduced_matmul_precision_keeps_accuracy(references) -> None:
    """TF32/bf16 float32 matmuls (set for the model) must not leak into the DFT."""
    case = ("chirp_full_scale", 163_840)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        out = run(LogMel(FeatureConfig()), [make_clip(*case)])
    finally:
        torch.set_float32_matmul_precision(previous)
    np.testing.assert_allclose(out[0], references[case], rtol=0, atol=F32_TOL)


def test_int16_scaled_audio_needs_float64(extractor) -> None:
    """The log floor is absolute, so |x| ~ 3e4 spans ~200 dB: float64 still matches."""
    clip = (30_000 * _chirp(16_000)).astype(np.float32)
    out = run(LogMel(FeatureConfig(), torch.float64), [clip])
    np.testing.assert_allclose(out[0], extract(extractor, clip), rtol=0, atol=F64_TOL)
