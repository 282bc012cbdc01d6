"""Shared fixtures: a tiny AST checkpoint whose head tells the test sounds apart, and a generated library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiosearch import synthetic as syn

TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _pooled(net, clips: list[np.ndarray]) -> torch.Tensor:
    """The head's input (layer-normed pooled output) for clips, via the Hugging Face reference path."""
    from transformers import ASTFeatureExtractor

    feats = ASTFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        pooled = net.audio_spectrogram_transformer(feats).pooler_output
        return net.classifier.layernorm(pooled)


def set_discriminative_head(path: Path, clips: list[tuple[np.ndarray, str]]) -> None:
    """Fit one classifier row per label on the given (16 kHz clip, label) pairs, silence the other labels.

    A random AST predicts near-identical labels for every clip. This head is a
    ridge one-vs-rest fit on the pooled embeddings of the test's own clips, so
    each generated sound gets its family's label with a clear margin.
    """
    from transformers import ASTForAudioClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    net = ASTForAudioClassification.from_pretrained(path).eval()
    label_ids = {name: i for i, name in net.config.id2label.items()}
    x = _pooled(net, [c for c, _ in clips]).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    gram = x1.T @ x1 + 1e-3 * torch.eye(x1.shape[1], dtype=x.dtype)
    weight = torch.zeros_like(net.classifier.dense.weight)
    bias = torch.full_like(net.classifier.dense.bias, -8.0)
    for name in sorted({label for _, label in clips}):
        target = torch.tensor([1.0 if label == name else -1.0 for _, label in clips], dtype=x.dtype)
        solution = 8.0 * torch.linalg.solve(gram, x1.T @ target)
        weight[label_ids[name]] = solution[:-1].float()
        bias[label_ids[name]] = solution[-1].float()
    with torch.no_grad():
        net.classifier.dense.weight.copy_(weight)
        net.classifier.dense.bias.copy_(bias)
    net.save_pretrained(path, safe_serialization=True)
    syn.readable_by_all(path)


def write(path: Path, samples: np.ndarray, rate: int, channels: int = 1, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = samples if channels == 1 else np.stack([samples] * channels, axis=1)
    sf.write(path, data, rate, **kwargs)
    return path


def mixed_40s() -> np.ndarray:
    """40 s whose 10.24 s segments each hold a different kind of sound."""
    parts = [syn.tone(330, 10.24), syn.noise(10.24, seed=7), syn.chord([196, 246.9, 293.7], 10.24), syn.clicks(9.28)]
    return np.concatenate(parts)


MIXED_LABELS = ["Sine wave", "White noise", "Music", "Clicking"]

# (path in the library, samples, rate, channels, soundfile options, label the test model gives it)
LIBRARY = [
    ("tones/a440.wav", lambda: syn.tone(440, 6, 44100), 44100, 2, {}, "Sine wave"),
    ("tones/e660.flac", lambda: syn.tone(660, 12, 22050), 22050, 1, {}, "Sine wave"),
    ("music/chord c.ogg", lambda: syn.chord([261.6, 329.6, 392.0], 7, 48000), 48000, 2, {}, "Music"),
    ("music/mixed_40s.wav", mixed_40s, 16000, 1, {}, MIXED_LABELS),
    ("noise/white.flac", lambda: syn.noise(9, seed=3), 16000, 1, {}, "White noise"),
    ("noise/pink.wav", lambda: syn.noise(5, 8000, seed=4, pink=True), 8000, 1, {}, "Pink noise"),
    ("clicks/clicks.wav", lambda: syn.clicks(4, per_second=6), 16000, 1, {"subtype": "PCM_16"}, "Clicking"),
    ("chirps/chirp.mp3", lambda: syn.chirp(300, 3000, 6, 32000), 32000, 1, {"format": "MP3"}, "Chirp tone"),
]


def make_library(root: Path) -> Path:
    """A small library in several formats, rates and channel counts, plus one non-audio file."""
    for rel, make, rate, channels, options, _ in LIBRARY:
        write(root / rel, make(), rate, channels, **options)
    (root / "notes.txt").write_text("not audio, ignored\n")
    return root


def labelled_segments(root: Path) -> list[tuple[np.ndarray, str]]:
    """Every library segment as the model will see it, with the label the test model should give it."""
    from audiosearch.audio import decode, segment

    out = []
    for rel, _, _, _, _, label in LIBRARY:
        pieces = segment(decode(root / rel).samples)
        labels = label if isinstance(label, list) else [label] * len(pieces)
        out.extend((piece.samples, name) for piece, name in zip(pieces, labels))
    return out


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Path:
    return make_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, library) -> Path:
    """A 2-layer AST with the 527 AudioSet labels, saved as safetensors with its feature extractor."""
    path = tmp_path_factory.mktemp("model") / "tiny-ast"
    syn.save_random_checkpoint(path, **TINY_CONFIG)
    set_discriminative_head(path, labelled_segments(library))
    return path


@pytest.fixture
def without_pyav(monkeypatch) -> None:
    """`import av` fails, as on a machine without PyAV: decoding falls back to the ffmpeg command."""
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
