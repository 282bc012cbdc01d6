"""Random AST checkpoints and generated audio, for tests and benchmarks.

Nothing here is downloaded: a checkpoint is an `ASTConfig` with random
weights, saved as safetensors next to its feature extractor, exactly the
layout `from_pretrained` reads for the real model. A random model's labels
mean nothing; it exists so the compute and the plumbing are real.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE


def audioset_labels() -> dict[int, str]:
    """The 527 AudioSet class names, by model output index."""
    text = (Path(__file__).parent / "data" / "audioset_class_labels.csv").read_text()
    return {int(row["index"]): row["display_name"] for row in csv.DictReader(text.splitlines())}


def save_random_checkpoint(path: str | Path, seed: int = 0, **config) -> Path:
    """Save a randomly initialised ASTForAudioClassification (ASTConfig defaults unless overridden)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard written: noise in tests and the demo

    labels = audioset_labels()
    torch.manual_seed(seed)
    cfg = ASTConfig(id2label=labels, label2id={v: k for k, v in labels.items()}, **config)
    model = ASTForAudioClassification(cfg).eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    ASTFeatureExtractor(num_mel_bins=cfg.num_mel_bins, max_length=cfg.max_length).save_pretrained(path)
    readable_by_all(path)
    return path


def readable_by_all(folder: Path) -> None:
    """Give a saved checkpoint's files the mode a plain file gets (0644 under umask 022): the safetensors
    writer creates its file 0600, which hides the model from every other user of a shared demo or cache."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def tone(freq: float, seconds: float, rate: int = SAMPLE_RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chord(freqs: list[float], seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return sum(tone(f, seconds, rate, 0.25 / len(freqs) * 2) for f in freqs).astype(np.float32)


def noise(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0, amp: float = 0.2, pink: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * rate))
    if pink:
        spectrum = np.fft.rfft(x)
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        x = np.fft.irfft(spectrum, len(x))
        x /= np.abs(x).max()
    return (amp * x).astype(np.float32)


def clicks(seconds: float, rate: int = SAMPLE_RATE, per_second: float = 8, amp: float = 0.8) -> np.ndarray:
    x = np.zeros(int(seconds * rate), dtype=np.float32)
    x[:: max(1, int(rate / per_second))] = amp
    return x


def chirp(f0: float, f1: float, seconds: float, rate: int = SAMPLE_RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (amp * np.sin(phase)).astype(np.float32)


def melody(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE, amp: float = 0.3) -> np.ndarray:
    """Plucked notes with harmonics at random pitches and lengths: music-like peaks for fingerprints."""
    rng = np.random.default_rng(seed)
    out, n = np.zeros(int(seconds * rate), np.float32), 0
    while n < len(out):
        length = int(rng.uniform(0.15, 0.6) * rate)
        f0 = 196.0 * 2 ** (rng.integers(0, 24) / 12)
        t = np.arange(min(length, len(out) - n)) / rate
        note = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 5)) * np.exp(-t * rng.uniform(3, 8))
        out[n : n + len(t)] += note.astype(np.float32)
        n += length
    return (amp * out / max(1e-9, np.abs(out).max())).astype(np.float32)


def bursts(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE, amp: float = 0.3) -> np.ndarray:
    """Sweeps and tones under decaying envelopes, with a little noise: effect-like sounds."""
    rng = np.random.default_rng(seed)
    out, n = np.zeros(int(seconds * rate), np.float32), 0
    while n < len(out):
        length = int(rng.uniform(0.2, 0.9) * rate)
        t = np.arange(min(length, len(out) - n)) / rate
        f0, f1 = rng.uniform(300, 3000, 2)
        phase = 2 * np.pi * np.cumsum(np.linspace(f0, f1, len(t))) / rate
        sound = (np.sin(phase) + 0.1 * rng.standard_normal(len(t))) * np.exp(-t * rng.uniform(2, 6))
        out[n : n + len(t)] += sound.astype(np.float32)
        n += length
    return (amp * out / max(1e-9, np.abs(out).max())).astype(np.float32)
