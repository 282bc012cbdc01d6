"""The embeddings are the model's: float32 matches the Hugging Face reference, bf16 and int8 match float32.

Reference path: each 16 kHz segment through `ASTFeatureExtractor` (float64
numpy fbank) and `ASTForAudioClassification` one at a time, pooled output
L2-normalised, label scores the sigmoid of the logits. Our path: the whole
pipeline (decode workers, segments batched across files, batched torch
features, the model at the chosen precision).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from audiosearch import synthetic as syn
from audiosearch.audio import decode, segment
from audiosearch.embedder import Embedder
from audiosearch.model import Model, fingerprint

from .conftest import LIBRARY

BATCH = 3  # smaller than most files' segment counts: batches straddle files


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """Full AST depth (12 layers) at a small width: bf16 rounding accumulates over depth, not width."""
    path = tmp_path_factory.mktemp("model") / "deep-ast"
    return syn.save_random_checkpoint(path, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                      intermediate_size=768)


@pytest.fixture(params=["tiny", "deep"])
def checkpoint(request, tiny_model, deep_model) -> Path:
    return tiny_model if request.param == "tiny" else deep_model


def library_files(library: Path) -> list[str]:
    return [str(library / rel) for rel, *_ in LIBRARY]


def pipeline(checkpoint: Path, files: list[str], precision: str, **options) -> dict[tuple[str, float], tuple]:
    """(path, start) -> (embedding, scores) through the whole pipeline on the CPU."""
    embedder = Embedder(str(checkpoint), device="cpu", precision=precision, batch_size=BATCH, **options)
    out = {}
    for f in embedder.embed_files(files):
        assert f.status == "ok", f.error
        for s in f.segments:
            out[(f.path, s.start)] = (s.embedding, s.scores)
    return out


def reference(checkpoint: Path, files: list[str]) -> dict[tuple[str, float], tuple]:
    """(path, start) -> (embedding, scores) the Hugging Face way, one segment at a time, float32."""
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    net = ASTForAudioClassification.from_pretrained(checkpoint).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        extractor = ASTFeatureExtractor.from_pretrained(checkpoint)
    out = {}
    for path in files:
        for piece in segment(decode(path).samples):
            feats = extractor(piece.samples, sampling_rate=16000, return_tensors="pt")["input_values"]
            with torch.inference_mode():
                pooled = net.audio_spectrogram_transformer(feats).pooler_output
                logits = net.classifier(pooled)
            emb = torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()
            out[(path, piece.start)] = (emb, torch.sigmoid(logits)[0].numpy())
    return out


def cosines(a: dict, b: dict) -> np.ndarray:
    assert a.keys() == b.keys()
    return np.array([float(np.dot(a[k][0], b[k][0])) for k in a])


def test_fp32_pipeline_is_the_hugging_face_model(checkpoint, library):
    files = library_files(library)
    ours, ref = pipeline(checkpoint, files, "fp32"), reference(checkpoint, files)
    assert len(ours) >= 12  # every test clip, the 40 s one as 4 segments
    cos = cosines(ours, ref)
    assert cos.min() > 0.99999, cos
    emb_diff = max(np.abs(ours[k][0] - ref[k][0]).max() for k in ref)
    score_diff = max(np.abs(ours[k][1] - ref[k][1]).max() for k in ref)
    assert emb_diff < 5e-5 and score_diff < 5e-5, (emb_diff, score_diff)  # measured: ~4e-6 both


def test_bf16_agrees_with_fp32(checkpoint, library):
    files = library_files(library)
    full, half = pipeline(checkpoint, files, "fp32"), pipeline(checkpoint, files, "bf16")
    cos = cosines(full, half)
    assert cos.min() >= 0.99, cos
    score_diff = max(np.abs(full[k][1] - half[k][1]).max() for k in full)
    assert score_diff < 0.02, score_diff  # measured: 5e-3 on the deep model


def top5_overlaps(full: dict, low: dict) -> list[int]:
    """Per segment, how many of `low`'s top-5 labels are in float32's top 5. A label whose float32
    score is within 0.001 of float32's fifth counts as in: the tiny model's head scores every label
    but a clip's own at ~0.00034 (logit -8 +- 0.02), so its ranks 2-5 are ties that any rounding reorders."""
    out = []
    for k in full:
        ref, got = full[k][1], low[k][1]
        fifth = np.sort(ref)[-5]
        out.append(int(sum(ref[j] >= fifth - 1e-3 for j in np.argsort(-got)[:5])))
    return out


def test_int8_agrees_with_fp32(checkpoint, library):
    """What search needs from int8 linear layers: each segment's embedding within cosine 0.99 of
    float32's, and at least 4 of its top-5 labels the same."""
    files = library_files(library)
    full, low = pipeline(checkpoint, files, "fp32"), pipeline(checkpoint, files, "int8")
    cos = cosines(full, low)
    assert cos.min() >= 0.99, cos
    assert min(top5_overlaps(full, low)) >= 4, top5_overlaps(full, low)
    assert all(np.argmax(full[k][1]) == np.argmax(low[k][1]) for k in full)


def test_int8_embeddings_do_not_depend_on_batch_companions(tiny_model, library):
    """int8 layers scale each input by its range: batched or alone, a segment gets the same embedding."""
    files = library_files(library)
    batched = pipeline(tiny_model, files, "int8")
    embedder = Embedder(str(tiny_model), device="cpu", precision="int8", batch_size=1, workers=0)
    single = {(f.path, s.start): (s.embedding, s.scores) for f in embedder.embed_files(files) for s in f.segments}
    assert cosines(batched, single).min() > 0.999999


def test_int8_quantises_the_encoders_linear_layers_only(tiny_model):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    net = Model(str(tiny_model), device="cpu", precision="int8").net
    kinds = {type(m) for m in net.audio_spectrogram_transformer.modules()}
    assert DynamicLinear in kinds and torch.nn.Linear not in kinds
    assert type(net.classifier.dense) is torch.nn.Linear
    assert net.audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight.dtype == torch.float32


def test_fused_projections_compute_what_the_three_did(tiny_model):
    """int8 fuses queries, keys and values into one layer: per-channel scales make it the same
    computation, in float32 (to rounding) and in int8 (the same integers, so the same output)."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from audiosearch.ast import Attention

    attention = next(m for m in Model(str(tiny_model), device="cpu", precision="fp32").net.modules()
                     if isinstance(m, Attention))
    x = torch.randn(2, 50, attention.o_proj.in_features)
    fused = copy.deepcopy(attention)
    fused.fuse_projections()
    assert not hasattr(fused, "q_proj")
    torch.testing.assert_close(fused(x), attention(x), rtol=1e-5, atol=1e-6)
    three, one = (quantize_dynamic(copy.deepcopy(m), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                   dtype=torch.qint8) for m in (attention, fused))
    torch.testing.assert_close(one(x), three(x), rtol=0, atol=1e-6)


def test_auto_picks_int8_only_where_allowed_and_bf16_is_not_native(monkeypatch):
    from audiosearch import model as model_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert model_module.resolve_precision("auto", cpu, allow_int8=True) == "int8"  # ingest, query
    assert model_module.resolve_precision("auto", cpu) == "fp32"  # embed, Embedder
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert model_module.resolve_precision("auto", cpu, allow_int8=True) == "bf16"


def test_embedder_defaults_to_float32_without_native_bf16(tiny_model, monkeypatch):
    from audiosearch import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert Embedder(str(tiny_model), device="cpu").model.precision == "fp32"


def test_capped_instruction_set_means_no_native_bf16(monkeypatch):
    from audiosearch.model import cpu_has_native_bf16

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()


def test_int8_on_a_gpu_is_a_clear_error():
    from audiosearch.errors import ModelLoadError
    from audiosearch.model import resolve_precision

    with pytest.raises(ModelLoadError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))


def test_bf16_tokens_are_float32_and_agree(tiny_model):
    signal = syn.chirp(200, 4000, 8)
    full = Embedder(str(tiny_model), device="cpu", precision="fp32", tokens=True).embed_waveform(signal, 16000)
    half = Embedder(str(tiny_model), device="cpu", precision="bf16", tokens=True).embed_waveform(signal, 16000)
    a, b = full[0].tokens, half[0].tokens
    assert b.dtype == np.float32 and b.shape == a.shape
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.99


def test_batching_does_not_change_embeddings(tiny_model, library):
    """Across-file batches, in-flight batches and the short last batch give what one segment at a time gives."""
    files = library_files(library)
    batched = pipeline(tiny_model, files, "fp32")
    single = {}
    embedder = Embedder(str(tiny_model), device="cpu", precision="fp32", batch_size=1, workers=0)
    for f in embedder.embed_files(files):
        single.update({(f.path, s.start): (s.embedding, s.scores) for s in f.segments})
    assert cosines(batched, single).min() > 0.999999


def test_fingerprint_does_not_depend_on_precision(tiny_model):
    prints = {fingerprint(Model(str(tiny_model), device="cpu", precision=p)) for p in ("fp32", "bf16", "int8")}
    assert len(prints) == 1


def test_bf16_casts_the_weights_once(tiny_model):
    """bf16 runs the network in bf16 (no per-op autocast), float32 stays float32."""
    assert next(Model(str(tiny_model), device="cpu", precision="bf16").net.parameters()).dtype == torch.bfloat16
    assert next(Model(str(tiny_model), device="cpu", precision="fp32").net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("device", ["gpu", "tpu", "mps", "cuda:x"])
def test_unknown_device_is_a_clear_error(device):
    from audiosearch.errors import ModelLoadError
    from audiosearch.model import resolve_device

    with pytest.raises(ModelLoadError, match="device"):
        resolve_device(device)


def test_a_staging_slot_is_not_rewritten_while_its_batch_may_be_in_flight(tiny_model, library, monkeypatch):
    """GPU staging (simulated: two slots, fake CUDA events): a run abandoned with a batch in flight
    must not let the next batch overwrite that batch's slot before its copy is waited for."""
    from audiosearch.model import PendingOutput

    embedder = Embedder(str(tiny_model), device="cpu", precision="fp32", batch_size=1, workers=0)
    embedder._slots = [tuple(t.clone() for t in embedder._slots[0]) for _ in range(2)]
    embedder._slot_pending = [None, None]

    class FakeEvent:
        synced = False

        def synchronize(self):
            self.synced = True

    last: dict[int, FakeEvent] = {}
    real = embedder.model.launch

    def launch(waves, lengths, **kwargs):
        slot = waves.data_ptr()
        assert slot not in last or last[slot].synced, "slot rewritten before its batch was waited for"
        last[slot] = event = FakeEvent()
        return PendingOutput(real(waves, lengths, **kwargs).result(), event)

    monkeypatch.setattr(embedder.model, "launch", launch)
    run = embedder.embed_files(library_files(library))
    next(run)
    run.close()  # abandoned: one batch launched and never collected
    signal = syn.chirp(200, 4000, 25)
    segments = embedder.embed_waveform(signal, 16000)
    assert len(segments) == 3 and all(event.synced for event in last.values())


def test_deferred_batches_read_their_own_slot(tiny_model, library):
    """GPU semantics on the CPU: two staging slots, and each batch computed only when its result
    is asked for (as a queued copy and forward run later on a GPU). If staging the next batch
    touched a slot whose batch was still in flight, these embeddings would come out wrong."""
    from audiosearch.model import PendingOutput

    files = library_files(library)
    eager = pipeline(tiny_model, files, "fp32")
    embedder = Embedder(str(tiny_model), device="cpu", precision="fp32", batch_size=BATCH, workers=1)
    embedder._slots = [tuple(t.clone() for t in embedder._slots[0]) for _ in range(2)]
    embedder._slot_pending = [None, None]
    real = embedder.model.launch

    class Deferred(PendingOutput):
        def __init__(self, waves, lengths):
            self.waves, self.lengths, self.output = waves, lengths, None

        def result(self):
            if self.output is None:
                self.output = real(self.waves, self.lengths).result()
            return self.output

    embedder.model.launch = lambda waves, lengths, **kwargs: Deferred(waves, lengths)
    deferred = {}
    for f in embedder.embed_files(files):
        deferred.update({(f.path, s.start): (s.embedding, s.scores) for s in f.segments})
    assert cosines(eager, deferred).min() > 0.999999


def test_index_records_precision_and_mixed_precisions_search_together(tiny_model, library, tmp_path):
    """Ingest in int8, query in float32 (same model: the index accepts it), add files in float32:
    `info` shows every precision the index was built with."""
    import json
    import shutil

    from typer.testing import CliRunner

    from audiosearch.cli import app

    def run(*args) -> str:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    part = tmp_path / "lib"
    shutil.copytree(library / "tones", part / "tones")
    index = tmp_path / "idx"
    common = ["--index", index, "--model", tiny_model, "--device", "cpu"]
    run("ingest", part, *common, "--precision", "int8")
    assert json.loads(run("info", "--index", index, "--json"))["precision"] == "int8"
    assert "precision" in run("info", "--index", index) and "int8" in run("info", "--index", index)
    clip = part / "tones" / "e660.flac"
    hits = json.loads(run("query", clip, *common, "--precision", "fp32", "--json"))["hits"]
    assert hits[0]["path"] == str(clip)
    shutil.copytree(library / "noise", part / "noise")
    run("ingest", part, *common, "--precision", "fp32")
    assert json.loads(run("info", "--index", index, "--json"))["precision"] == "fp32+int8"
