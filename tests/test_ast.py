"""audiosearch.ast, our AST network, against transformers' on the same checkpoint: same outputs, same fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from audiosearch.ast import ASTForAudioClassification
from audiosearch.model import Model, _fingerprint


def test_same_outputs_and_fingerprint_as_transformers(tiny_model):
    from transformers import ASTForAudioClassification as Reference

    ours = ASTForAudioClassification.from_pretrained(tiny_model)
    ref = Reference.from_pretrained(tiny_model).eval()
    feats = torch.randn(3, 1024, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.audio_spectrogram_transformer(feats), ref.audio_spectrogram_transformer(feats)
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.classifier(a.pooler_output), ref.classifier(b.pooler_output), atol=1e-5,
                                   rtol=1e-4)
    assert list(ours.state_dict()) == list(ref.state_dict())  # names, so indexes keep their model fingerprint
    assert _fingerprint(ours) == _fingerprint(ref) == Model(str(tiny_model), device="cpu").fingerprint


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        ASTForAudioClassification.from_pretrained(bad)
