"""`embed` and `export`: feature files computed from audio or read out of an index, and the Python API behind them."""

from __future__ import annotations

import json
import os
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from audiosearch import Embedder, read_features
from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.errors import AudioDecodeError, FeatureFileError
from audiosearch.embedding_files import FeatureHeader, FeatureRows, FeatureWriter
from audiosearch.index import VectorIndex
import audiosearch.ingest as ingest_module
from audiosearch.ingest import ingest

from .conftest import write

runner = CliRunner()
LABELS = [f"label {i}" for i in range(7)]


def run(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def index(library, tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("index") / "idx"
    ingest([library], index_dir=path, model=str(tiny_model), device="cpu", precision="fp32")
    return path


@pytest.fixture(scope="module")
def exported(index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "features.parquet"
    run("export", "--index", index, "-o", out)
    return out


@pytest.fixture(scope="module")
def embedded(library, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "features.npz"
    run("embed", library, "-o", out, "--model", tiny_model, "--device", "cpu", "--precision", "fp32", "--tokens")
    return out


def test_export_is_the_index_bit_for_bit(index, exported, tiny_model):
    with sqlite3.connect(index / "audiosearch.db") as db:
        rows = db.execute(
            'SELECT segments.id, path, start, "end", vector, scores FROM segments '
            "JOIN files ON files.id = file_id ORDER BY segments.id"
        ).fetchall()
    ids, paths, starts, ends, vectors, scores = zip(*rows)
    features = read_features(exported)
    assert features.paths == list(paths) and len(paths) >= 12
    assert features.starts.tolist() == list(starts) and features.ends.tolist() == list(ends)
    assert features.embeddings.dtype == np.float32 and features.embeddings.tobytes() == b"".join(vectors)
    assert features.scores.shape == (len(rows), 527)
    assert features.scores.astype("<f2").tobytes() == b"".join(scores)
    faiss_vectors = VectorIndex.load(index / "vectors.faiss").reconstruct(np.array(ids, dtype=np.int64))
    assert np.array_equal(faiss_vectors, features.embeddings)
    assert features.metadata["model"] == str(tiny_model) and features.failed == []
    assert features.metadata["source"] == str(index.resolve()) and features.metadata["params"]["hop_seconds"] == 10.24


def test_embed_agrees_with_the_index(exported, embedded):
    stored, fresh = read_features(exported), read_features(embedded)
    key = lambda f: {(p, s, e): i for i, (p, s, e) in enumerate(zip(f.paths, f.starts.tolist(), f.ends.tolist()))}
    stored_rows, fresh_rows = key(stored), key(fresh)
    assert set(stored_rows) == set(fresh_rows)
    order = [fresh_rows[k] for k in stored_rows]
    assert np.allclose(fresh.embeddings[order], stored.embeddings, atol=1e-5)
    assert np.allclose(fresh.scores[order], stored.scores, atol=1e-3)
    assert fresh.metadata["fingerprint"] == stored.metadata["fingerprint"]


def test_tokens_have_the_patch_grid_shape(embedded, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    time_patches = (config["max_length"] - config["patch_size"]) // config["time_stride"] + 1
    freq_patches = (config["num_mel_bins"] - config["patch_size"]) // config["frequency_stride"] + 1
    features = read_features(embedded)
    grid = (time_patches, freq_patches, config["hidden_size"])
    assert features.tokens.shape == (len(features.paths), *grid)
    assert tuple(features.metadata["token_shape"]) == grid
    assert np.isfinite(features.tokens).all() and features.tokens.std() > 0


def test_tokens_are_laid_out_time_by_frequency(tiny_model):
    """Token [t, f] is the patch at time t and frequency f; AST itself orders patches frequency-major."""
    embedder = Embedder(str(tiny_model), device="cpu", precision="fp32", tokens=True)
    signal = syn.chirp(200, 4000, 8)
    tokens = embedder.embed_waveform(signal, 16000)[0].tokens
    model = embedder.model
    with torch.inference_mode():
        feats = model.logmel(torch.from_numpy(signal)[None], torch.tensor([len(signal)]))
        patches = model.net.audio_spectrogram_transformer(feats).last_hidden_state[0, 2:].numpy()
    time_patches, freq_patches = model.patch_grid()
    for t, f in [(0, 0), (3, 1), (time_patches - 1, freq_patches - 1), (50, 7)]:
        assert np.allclose(tokens[t, f], patches[f * time_patches + t], atol=1e-5)


def _rows(n: int, offset: int = 0, tokens: bool = True) -> FeatureRows:
    rng = np.random.default_rng(offset)
    return FeatureRows(
        paths=[f"/audio/{offset + i} é.wav" for i in range(n)],
        starts=np.arange(n) * 10.24, ends=np.arange(n) * 10.24 + 7.5,
        embeddings=rng.standard_normal((n, 4), dtype=np.float32),
        scores=rng.random((n, len(LABELS)), dtype=np.float32),
        tokens=rng.standard_normal((n, 3, 2, 4), dtype=np.float32) if tokens else None,
    )


def _header(**options) -> FeatureHeader:
    return FeatureHeader(model="m", fingerprint="f", labels=LABELS, dim=4, params={"hop_seconds": 10.24},
                         source="embed", **options)


def _write(path: Path, header: FeatureHeader, batches: list[FeatureRows]) -> int:
    with FeatureWriter(path, header) as writer:
        for rows in batches:
            writer.write(rows)
        return writer.commit([("/audio/bad.wav", "not readable audio")], [("/audio/short.wav", "too short")])


@pytest.mark.parametrize("float16", [False, True])
@pytest.mark.parametrize("name", ["f.parquet", "f.npz"])
def test_parquet_and_npz_round_trip(tmp_path, name, float16):
    batches = [_rows(3), _rows(2, offset=3)]
    _write(tmp_path / name, _header(token_shape=(3, 2, 4), float16=float16), batches)
    back = read_features(tmp_path / name)
    dtype = np.float16 if float16 else np.float32
    assert back.paths == batches[0].paths + batches[1].paths
    assert back.starts.tolist() == [0.0, 10.24, 20.48, 0.0, 10.24] and back.ends[1] == 10.24 + 7.5
    for got, key in [(back.embeddings, "embeddings"), (back.scores, "scores"), (back.tokens, "tokens")]:
        want = np.concatenate([getattr(b, key) for b in batches]).astype(dtype)
        assert got.dtype == dtype and np.array_equal(got, want)
    assert back.labels == LABELS and back.metadata["rows"] == 5 and back.metadata["model"] == "m"
    assert back.failed == [{"path": "/audio/bad.wav", "error": "not readable audio"}]
    assert back.skipped == [{"path": "/audio/short.wav", "reason": "too short"}]


def test_file_layouts_for_other_tools(tmp_path):
    header = _header(token_shape=(3, 2, 4))
    _write(tmp_path / "f.parquet", header, [_rows(3)])
    _write(tmp_path / "f.npz", header, [_rows(3)])
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert schema.field("tokens").type == pa.list_(pa.float32(), 24)
    assert json.loads(schema.metadata[b"audiosearch"])["labels"] == LABELS
    with np.load(tmp_path / "f.npz") as npz:
        shapes = {name: npz[name].shape for name in npz.files}
        assert npz["label_names"].tolist() == LABELS and json.loads(str(npz["metadata"]))["rows"] == 3
    assert shapes["embedding"] == (3, 4) and shapes["scores"] == (3, 7) and shapes["tokens"] == (3, 3, 2, 4)
    assert shapes["path"] == shapes["start"] == (3,)


def test_npy_is_the_matrix_with_a_json_sidecar(tmp_path):
    rows = _rows(3, tokens=False)
    _write(tmp_path / "f.npy", _header(), [rows])
    assert np.array_equal(np.load(tmp_path / "f.npy"), rows.embeddings)
    sidecar = json.loads((tmp_path / "f.json").read_text())
    assert sidecar["path"] == rows.paths and sidecar["labels"] == LABELS
    back = read_features(tmp_path / "f.npy")
    assert back.paths == rows.paths and np.array_equal(back.embeddings, rows.embeddings)
    assert back.scores is None and back.starts.tolist() == rows.starts.tolist()


def test_unfinished_file_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with FeatureWriter(tmp_path / "f.parquet", _header()) as writer:
            writer.write(_rows(2, tokens=False))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["features.npz", "features.npy"])
def test_export_formats_agree(index, exported, tmp_path, name):
    run("export", "--index", index, "-o", tmp_path / name)
    parquet, other = read_features(exported), read_features(tmp_path / name)
    assert other.paths == parquet.paths and np.array_equal(other.embeddings, parquet.embeddings)
    assert other.starts.tolist() == parquet.starts.tolist()
    if name.endswith(".npz"):
        assert np.array_equal(other.scores, parquet.scores)


def test_top_labels_keeps_n(index, exported, tmp_path):
    run("export", "--index", index, "-o", tmp_path / "top.npz", "--top-labels", "3")
    full, top = read_features(exported), read_features(tmp_path / "top.npz")
    assert top.scores is None and top.top_labels.shape == top.top_scores.shape == (len(full.paths), 3)
    assert top.metadata["top_labels"] == 3
    assert np.array_equal(top.top_scores, -np.sort(-full.scores, axis=1)[:, :3])
    index_of = {name: i for i, name in enumerate(full.labels)}
    for row, names in enumerate(top.top_labels):
        assert [full.scores[row, index_of[n]] for n in names] == top.top_scores[row].tolist()


def test_float16_halves_the_size(library, tiny_model, tmp_path):
    files = [library / "tones" / "a440.wav", library / "noise" / "white.flac"]
    common = ["--model", tiny_model, "--device", "cpu", "--precision", "fp32", "--tokens", "--workers", "0"]
    run("embed", *files, "-o", tmp_path / "full.npz", *common)
    run("embed", *files, "-o", tmp_path / "half.npz", *common, "--float16")
    with zipfile.ZipFile(tmp_path / "full.npz") as full, zipfile.ZipFile(tmp_path / "half.npz") as half:
        for name in ("embedding.npy", "scores.npy", "tokens.npy"):
            assert 0 < 2 * half.getinfo(name).file_size - full.getinfo(name).file_size <= 256  # the .npy header
    assert (tmp_path / "half.npz").stat().st_size < 0.6 * (tmp_path / "full.npz").stat().st_size
    full, half = read_features(tmp_path / "full.npz"), read_features(tmp_path / "half.npz")
    assert half.embeddings.dtype == half.tokens.dtype == half.scores.dtype == np.float16
    assert np.allclose(half.tokens, full.tokens, rtol=1e-3, atol=1e-3)
    assert np.allclose(half.embeddings, full.embeddings, rtol=1e-3, atol=1e-3)


def test_bad_files_are_listed_and_skipped(tiny_model, tmp_path):
    folder = tmp_path / "mixed"
    good = write(folder / "good.wav", syn.tone(440, 3), 16000)
    (folder / "broken.wav").write_bytes(b"not audio at all" * 20)
    short = write(folder / "short.wav", syn.tone(440, 0.05), 16000)  # embedded: every file with a sample is
    write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)  # no sample: skipped
    out = tmp_path / "f.parquet"
    args = ["embed", folder, "-o", out, "--model", tiny_model, "--device", "cpu", "--precision", "fp32"]
    summary = json.loads(run(*args, "--json"))
    assert [f["path"] for f in summary["failed"]] == [str(folder / "broken.wav")]
    assert [f["path"] for f in summary["skipped"]] == [str(folder / "empty.wav")]
    assert summary["files"] == 2 and summary["segments"] == 2
    features = read_features(out)
    assert sorted(features.paths) == [str(good), str(short)]
    assert [f["path"] for f in features.failed] == [str(folder / "broken.wav")]
    text = run(*args)
    assert f"failed: {folder / 'broken.wav'}: not readable audio" in text and "1 failed, 1 skipped" in text


def test_unlistable_folder_is_reported(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "lib"
    write(folder / "open" / "a.wav", syn.tone(440, 3), 16000)
    closed = write(folder / "closed" / "b.wav", syn.noise(3), 16000).parent
    real = os.scandir

    def deny(path="."):  # as the kernel would for a user without the folder's read permission (tests run as root)
        if isinstance(path, (str, os.PathLike)) and Path(path) == closed:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ingest_module.os, "scandir", deny)
    out = tmp_path / "f.npz"
    summary = json.loads(run("embed", folder, "-o", out, "--model", tiny_model, "--device", "cpu", "--json"))
    assert summary["failed"] == [{"path": str(closed), "error": "cannot list folder: Permission denied"}]
    assert summary["files"] == 1 and read_features(out).failed == summary["failed"]


def test_embed_waveform_equals_embed_files(tiny_model, tmp_path):
    signal = syn.chord([220.0, 277.2, 329.6], 12, 44100)
    wav = write(tmp_path / "chord.wav", signal, 44100, subtype="FLOAT")
    embedder = Embedder(str(tiny_model), device="cpu")
    in_memory = embedder.embed_waveform(signal, 44100)
    [from_file] = list(embedder.embed_files([wav]))
    assert from_file.status == "ok" and len(from_file.segments) == len(in_memory) == 2
    for a, b in zip(in_memory, from_file.segments):
        assert (a.start, a.end) == (b.start, b.end)
        assert np.array_equal(a.embedding, b.embedding) and np.array_equal(a.scores, b.scores)
    with pytest.raises(AudioDecodeError, match="no samples"):
        embedder.embed_waveform(np.zeros(0, dtype=np.float32), 16000)


@pytest.mark.parametrize(
    "args,message",
    [
        (["export", "--index", "{index}", "-o", "{tmp}/f.parquet", "--tokens"], "keeps no patch tokens"),
        (["export", "--index", "{index}", "-o", "{tmp}/f.parquet", "--top-labels", "600"], "between 1 and 527"),
        (["export", "--index", "{tmp}/nothing", "-o", "{tmp}/f.parquet"], "no index at"),
        (["embed", "{library}", "-o", "{tmp}/f.npy", "--tokens"], "a .npy file holds only the embedding matrix"),
        (["embed", "{library}", "-o", "{tmp}/f.csv"], "cannot tell the format"),
    ],
)
def test_bad_requests_are_one_line(index, library, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, [a.format(index=index, library=library, tmp=out) for a in args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []


def test_reading_something_else_is_one_line(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(FeatureFileError, match="not an audiosearch feature file"):
        read_features(tmp_path / "other.parquet")
    with pytest.raises(FeatureFileError, match="no such feature file"):
        read_features(tmp_path / "missing.npz")


def test_clips_under_one_frame_are_zero_padded_and_longer_ones_fed_as_they_are(tiny_model):
    from audiosearch.embedder import MIN_SAMPLES, Embedder
    from audiosearch.model import Model

    model = Model(str(tiny_model), device="cpu", precision="fp32")
    embedder = Embedder(model, workers=0, batch_size=4)
    rng = np.random.default_rng(0)
    short = (0.3 * rng.standard_normal(MIN_SAMPLES - 150)).astype(np.float32)
    padded = np.concatenate([short, np.zeros(150, np.float32)])
    (got,) = embedder.embed_waveform(short, 16000)
    (want,) = embedder.embed_waveform(padded, 16000)
    assert np.array_equal(got.embedding, want.embedding) and got.end == len(short) / 16000

    longer = (0.3 * rng.standard_normal(3 * MIN_SAMPLES)).astype(np.float32)  # fed with its own length
    (got,) = embedder.embed_waveform(longer, 16000)
    wave = torch.zeros(1, len(longer))
    wave[0] = torch.from_numpy(longer)
    direct = model(wave, torch.tensor([len(longer)]))
    # Not bit-equal on every CPU: oneDNN picks other kernels for other batch shapes (1e-8 apart on an
    # AVX-512 EPYC). Padding the clip to a frame boundary would move it by far more than this.
    np.testing.assert_allclose(got.embedding, direct.embeddings[0].numpy(), rtol=1e-5, atol=1e-6)
