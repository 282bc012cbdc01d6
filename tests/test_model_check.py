"""An index refuses any checkpoint but the one that built it: every weight counts."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from audiosearch import synthetic as syn
from audiosearch.errors import ModelMismatch
from audiosearch.ingest import ingest
from audiosearch.model import Model, fingerprint, legacy_fingerprint

from .conftest import write


def changed_copy(source: Path, target: Path, weight: str) -> Path:
    """`source` saved again with one element of one weight changed."""
    from transformers import ASTForAudioClassification

    shutil.copytree(source, target)
    net = ASTForAudioClassification.from_pretrained(source)
    with torch.no_grad():
        net.get_parameter(weight).view(-1)[0] += 1e-3
    net.save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def indexed(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model-check")
    lib = root / "lib"
    write(lib / "tone.wav", syn.tone(440, 2.0), 16000)
    ingest([lib], index_dir=root / "idx", model=str(tiny_model), device="cpu", precision="fp32")
    return lib, root / "idx"


ENCODER_WEIGHT = "audio_spectrogram_transformer.layers.1.attention.q_proj.weight"


def test_a_checkpoint_with_one_encoder_weight_changed_is_refused(indexed, tiny_model, tmp_path):
    lib, index = indexed
    other = changed_copy(tiny_model, tmp_path / "other", ENCODER_WEIGHT)
    assert fingerprint(Model(str(other), device="cpu")) != fingerprint(Model(str(tiny_model), device="cpu"))
    write(lib.parent / "lib2" / "new.wav", syn.noise(2.0), 16000)
    with pytest.raises(ModelMismatch, match="was built with model"):
        ingest([lib.parent / "lib2"], index_dir=index, model=str(other), device="cpu")


def test_the_same_weights_elsewhere_are_the_same_model(indexed, tiny_model, tmp_path):
    lib, index = indexed
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    summary = ingest([lib], index_dir=index, model=str(copy), device="cpu")
    assert summary.unchanged == 1


def test_indexes_with_the_old_fingerprint_are_still_checked(indexed, tiny_model, tmp_path):
    lib, index = indexed
    tiny = Model(str(tiny_model), device="cpu")
    with sqlite3.connect(index / "audiosearch.db") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'fingerprint'", (legacy_fingerprint(tiny),))
    assert ingest([lib], index_dir=index, model=str(tiny_model), device="cpu").unchanged == 1
    other = changed_copy(tiny_model, tmp_path / "other", "classifier.dense.weight")
    with pytest.raises(ModelMismatch):
        ingest([lib], index_dir=index, model=str(other), device="cpu")
