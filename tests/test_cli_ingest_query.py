"""End to end through the CLI, as a user runs it: ingest a generated library, then query it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from typer.testing import CliRunner

from audiosearch.cli import app

from .conftest import mixed_40s, write

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def query_json(index: Path, model: Path, clip: Path, *extra: str) -> list[dict]:
    """The hits of `query --json` (one object per clip; see test_cli_output.py for the whole object)."""
    return json.loads(run("query", clip, "--index", index, "--model", model, "--json", *extra))["hits"]


@pytest.fixture(scope="module")
def index(library, tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("index") / "idx"
    out = run("ingest", library, "--index", path, "--model", tiny_model)
    assert "8 added" in out and "0 failed" in out and "1 non-audio ignored" in out
    return path


def test_library_file_comes_back_first(index, tiny_model, library):
    hits = query_json(index, tiny_model, library / "tones" / "a440.wav", "--no-filter")
    assert hits[0]["path"] == str(library / "tones" / "a440.wav")
    assert hits[0]["similarity"] >= 0.99


@pytest.mark.parametrize("fmt,ext", [("OGG", "ogg"), ("MP3", "mp3")])
def test_reencoded_copy_finds_the_original(index, tiny_model, library, tmp_path, fmt, ext):
    original = library / "noise" / "white.flac"
    data, rate = sf.read(original)
    copy = write(tmp_path / f"copy.{ext}", data.astype("float32"), rate, format=fmt)
    hits = query_json(index, tiny_model, copy, "--no-filter")
    assert hits[0]["path"] == str(original)


def test_excerpt_finds_its_segment(index, tiny_model, library, tmp_path):
    third = mixed_40s()[2 * 163840 : 3 * 163840]
    clip = write(tmp_path / "third.wav", third, 16000, subtype="FLOAT")
    hits = query_json(index, tiny_model, clip, "--no-filter")
    assert hits[0]["path"] == str(library / "music" / "mixed_40s.wav")
    assert (hits[0]["start"], hits[0]["end"]) == (20.48, 30.72)
    assert hits[0]["similarity"] >= 0.99


def test_default_filter_keeps_the_query_label(index, tiny_model, library):
    clip = library / "tones" / "e660.flac"
    filtered = query_json(index, tiny_model, clip)
    unfiltered = query_json(index, tiny_model, clip, "--no-filter")
    assert filtered and all(any(l["label"] == "Sine wave" for l in h["labels"]) for h in filtered)
    assert len(unfiltered) > len(filtered)


def test_label_option_filters(index, tiny_model, library):
    hits = query_json(index, tiny_model, library / "tones" / "a440.wav", "--label", "white noise")
    assert {Path(h["path"]).name for h in hits} >= {"white.flac"}
    similar = [h for h in hits if h["match"]["kind"] == "similar"]
    assert similar and all(any(l["label"] == "White noise" for l in h["labels"]) for h in similar)
    # the clip is a library file: the filter does not hide its verified duplicate, which comes first
    assert hits[0]["path"] == str(library / "tones" / "a440.wav") and hits[0]["match"]["kind"] == "duplicate"


def test_json_matches_table(index, tiny_model, library):
    clip = library / "clicks" / "clicks.wav"
    hits = query_json(index, tiny_model, clip, "-k", "3", "--no-filter")
    table = run("query", clip, "--index", index, "--model", tiny_model, "-k", "3", "--no-filter")
    assert len(hits) == 3 and {"rank", "similarity", "path", "start", "end", "labels"} <= set(hits[0])
    for hit in hits:
        assert Path(hit["path"]).name in table and f"{hit['similarity']:.4f}" in table


def test_info_and_labels(index):
    info = json.loads(run("info", "--index", index, "--json"))
    assert info["files"] == {"ok": 8} and info["segments"] >= 12 and info["vector_index"]["ntotal"] == info["segments"]
    labels = {row["label"]: row["segments"] for row in json.loads(run("labels", "--index", index, "--json"))}
    assert labels["Sine wave"] >= 2 and labels["White noise"] >= 1


def test_second_ingest_changes_nothing(index, tiny_model, library):
    out = run("ingest", library, "--index", index)
    assert "0 added" in out and "8 unchanged" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["ingest", "/no/such/folder"], "no such file or folder"),
        (["query", "/no/such/clip.wav"], "no such file"),
        (["info", "--index", "/no/such/index"], "no index at"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path):
    result = runner.invoke(app, args + ([] if "--index" in args else ["--index", str(tmp_path / "idx")]))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["ingest", str(tmp_path / "empty"), "--index", str(tmp_path / "idx")])
    assert result.exit_code == 1 and "no audio files found" in result.output


def test_clip_that_is_not_audio(index, tiny_model, tmp_path):
    clip = tmp_path / "fake.wav"
    clip.write_bytes(b"this is not a wav file at all" * 10)
    result = runner.invoke(app, ["query", str(clip), "--index", str(index), "--model", str(tiny_model)])
    assert result.exit_code == 1 and "not readable audio" in result.output


def test_unknown_label_suggests(index, tiny_model, library):
    clip = library / "tones" / "a440.wav"
    result = runner.invoke(app, ["query", str(clip), "--index", str(index), "--label", "Sine wav"])
    assert result.exit_code == 1 and "'Sine wave'" in result.output


def test_other_model_is_refused(index, library, tmp_path):
    from audiosearch.synthetic import save_random_checkpoint

    other = save_random_checkpoint(tmp_path / "other", seed=1, hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=128)
    result = runner.invoke(app, ["query", str(library / "tones" / "a440.wav"), "--index", str(index),
                                 "--model", str(other)])
    assert result.exit_code == 1 and "was built with model" in result.output


def test_memory_budget_compresses_and_is_remembered(library, tiny_model, tmp_path):
    index = tmp_path / "small"
    run("ingest", library, "--index", index, "--model", tiny_model, "--memory-budget", "0.000001")  # ~1 kB
    info = json.loads(run("info", "--index", index, "--json"))
    assert "sqfp16" in info["vector_index"]["kind"]
    hits = query_json(index, tiny_model, library / "tones" / "a440.wav", "--no-filter")
    assert hits[0]["path"] == str(library / "tones" / "a440.wav") and hits[0]["similarity"] >= 0.99
    run("ingest", library, "--index", index)
    assert "sqfp16" in json.loads(run("info", "--index", index, "--json"))["vector_index"]["kind"]


def test_device_cpu_keeps_faiss_training_on_the_cpu(index):
    from audiosearch.collection import Collection

    for device, expected in (("cpu", "cpu"), ("auto", "auto"), ("cuda", "auto")):
        collection = Collection(index, device=device)
        try:
            assert collection.index_options().device == expected
        finally:
            collection.close()
