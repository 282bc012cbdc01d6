"""The command line as a new user meets it: model paths, output people read and pipe, JSON, the new commands."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from audiosearch.cli import app
from audiosearch.query import FORMAT_VERSION, Hit, QueryResult
from audiosearch.render import clock, duration, plural, print_hits, shorten_left

runner = CliRunner()


def cli(*args: object, code: int = 0, **kwargs) -> str:
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def index(library, tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("out-index") / "idx"
    cli("ingest", library, "--index", path, "--model", tiny_model)
    return path


# -- 1. the model an index records --------------------------------------------
def test_relative_model_round_trips_from_another_folder(library, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    index = tmp_path / "idx"
    cli("ingest", library / "tones", "--index", index, "--model", tiny_model.name)
    info = json.loads(cli("info", "--index", index, "--json"))
    assert info["model"] == str(tiny_model.resolve())
    monkeypatch.chdir(tmp_path)
    hits = json.loads(cli("query", library / "tones" / "a440.wav", "--index", index, "--json"))["hits"]
    assert hits[0]["path"] == str(library / "tones" / "a440.wav")


def test_missing_stored_model_is_said_at_once(library, tiny_model, tmp_path, monkeypatch):
    model = shutil.copytree(tiny_model, tmp_path / "moved-away")
    index = tmp_path / "idx"
    cli("ingest", library / "tones", "--index", index, "--model", model)
    shutil.rmtree(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    out = cli("query", library / "tones" / "a440.wav", "--index", index, code=1)
    assert f"{model} does not exist" in out and "Traceback" not in out
    assert time.monotonic() - started < 5


def test_unreadable_checkpoint_is_not_called_missing(tiny_model, tmp_path):
    if os.geteuid() == 0:
        from audiosearch.model_ref import _check_readable

        model = shutil.copytree(tiny_model, tmp_path / "ckpt")
        (model / "model.safetensors").chmod(0)
        # root reads anything: check the message path directly with access() patched out
        import audiosearch.model_ref as ref

        real = ref.os.access
        ref.os.access = lambda p, mode: not str(p).endswith("model.safetensors")
        try:
            with pytest.raises(Exception, match="permission denied for model.safetensors"):
                _check_readable(model)
        finally:
            ref.os.access = real
        return
    model = shutil.copytree(tiny_model, tmp_path / "ckpt")
    (model / "model.safetensors").chmod(0)
    out = cli("embed", tiny_model.parent, "-o", tmp_path / "f.npz", "--model", model, code=1)
    assert "permission denied" in out


def test_hub_id_offline_and_uncached_fails_fast(monkeypatch):
    from audiosearch.errors import ModelLoadError
    from audiosearch.model_ref import check_model_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(ModelLoadError, match="offline"):
        check_model_available("someone/not-cached-anywhere")


# -- 2. output people read and pipe -------------------------------------------
def _result(path: str, start: float = 0.0) -> QueryResult:
    hit = Hit(1, 0.98765, path, start, start + 10.24, [("Sine wave", 0.99), ("Music", 0.2)], 7)
    return QueryResult([hit], [("Sine wave", 0.99)], ["Sine wave"], 4, clip="q.wav", filter_source="top label",
                       searched=4, query_segments=1)


def test_table_at_80_columns_keeps_paths_whole_and_shortens_from_the_left():
    deep = "/data/" + "/".join(f"folder_number_{i}" for i in range(8)) + "/the_file_name.flac"
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    print_hits(console, _result(deep, start=3725.0))
    text = buf.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    path_lines = [line for line in text.splitlines() if "the_file_name.flac" in line]
    assert len(path_lines) == 1 and "…" in path_lines[0]  # one line, file name whole, left end elided
    assert "similar 1:02:05.00–1:02:15.24" in text


def test_piped_query_is_tab_separated_one_row_per_line(index, tiny_model, library):
    out = cli("query", library / "tones" / "a440.wav", "--index", index, "--no-filter", "-k", "3")
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert rows[0] == ["rank", "similarity", "path", "match", "start", "end", "labels"]
    assert len(rows) == 4 and all(len(r) == 7 for r in rows)
    assert any(r[2].endswith("a440.wav") for r in rows[1:])


def test_times_sizes_and_plurals():
    assert [clock(6), clock(65.3), clock(3723)] == ["6.00", "1:05.30", "1:02:03.00"]
    assert [duration(13), duration(245), duration(9000)] == ["13.0 s", "4 min 05 s", "2.50 h"]
    assert plural(1, "segment") == "1 segment" and plural(2, "segment") == "2 segments"
    assert shorten_left("abcdef/name.wav", 11) == "…/name.wav" and shorten_left("abc/defgh.wav", 8) == "…/defgh.wav"


def test_noop_ingest_says_so_and_failures_give_exit_3(library, tiny_model, tmp_path):
    lib = shutil.copytree(library / "tones", tmp_path / "lib")
    (lib / "broken.wav").write_bytes(b"RIFF not really")
    index = tmp_path / "idx"
    first = cli("ingest", lib, "--index", index, "--model", tiny_model, code=3)
    assert "1 failed" in first and "broken.wav" in first
    again = cli("ingest", lib, "--index", index)
    assert "nothing new to embed" in again and "0.0 segments/s" not in again
    assert "1 file that failed before" in again
    errors = cli("info", "--index", index, "--errors")
    assert "broken.wav" in errors and "segments" not in errors


def test_info_errors_says_when_there_are_none(index):
    assert "no files failed or were skipped" in cli("info", "--index", index, "--errors")


def test_ignored_files_are_named_in_json(library, tiny_model, tmp_path):
    summary = json.loads(cli("ingest", library, "--index", tmp_path / "idx", "--model", tiny_model, "--json"))
    assert summary["ignored_files"] == [str(library / "notes.txt")]


# -- 3. JSON, new commands, several clips -------------------------------------
def test_version():
    assert cli("--version").startswith("audiosearch ")


def test_query_json_schema(index, library):
    obj = json.loads(cli("query", library / "tones" / "e660.flac", "--index", index, "--json", "-k", "2"))
    assert obj["format_version"] == FORMAT_VERSION == 1
    assert set(obj) == {"format_version", "clip", "query_segments", "query_labels", "filter", "matching_segments",
                        "duplicates", "hits"}
    assert obj["filter"] == {"labels": ["Sine wave"], "source": "top label"}
    assert obj["query_labels"][0]["label"] == "Sine wave" and obj["matching_segments"] >= len(obj["hits"])
    assert set(obj["hits"][0]) == {"rank", "similarity", "path", "start", "end", "labels", "segment_id", "file_id",
                                   "match"}
    unfiltered = json.loads(cli("query", library / "tones" / "e660.flac", "--index", index, "--json", "--no-filter"))
    assert unfiltered["filter"] is None


def test_errors_are_json_on_stderr_with_json(index, tmp_path):
    result = CliRunner().invoke(
        app, ["query", str(tmp_path / "none.wav"), "--index", str(index), "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(result.stderr)["error"].startswith("no such file")


def test_several_clips_and_stdin_in_one_run(index, library):
    a, b = library / "tones" / "a440.wav", library / "noise" / "white.flac"
    out = cli("query", a, "-", b, "--index", index, "--json", "--no-filter", input=a.read_bytes())
    objects = [json.loads(line) for line in out.splitlines()]
    assert [Path(o["hits"][0]["path"]).name for o in objects] == ["a440.wav", "a440.wav", "white.flac"]
    assert objects[0]["clip"] == str(a) and objects[2]["clip"] == str(b)


def test_labels_all_lists_the_whole_vocabulary(index):
    present = json.loads(cli("labels", "--index", index, "--json"))
    everything = json.loads(cli("labels", "--index", index, "--all", "--json"))
    assert len(everything) == 527 > len(present)
    assert {r["label"] for r in present} <= {r["label"] for r in everything}


def test_remove_drops_files_not_disk(library, tiny_model, tmp_path):
    index = tmp_path / "idx"
    cli("ingest", library, "--index", index, "--model", tiny_model)
    out = cli("remove", library / "tones", library / "nothing-here.wav", "--index", index)
    assert "2 files removed" in out and "not in the index" in out
    assert (library / "tones" / "a440.wav").exists()
    info = json.loads(cli("info", "--index", index, "--json"))
    assert info["files"] == {"ok": 6} and info["vector_index"]["ntotal"] == info["segments"]
    cli("remove", library / "nothing-here.wav", "--index", index, code=1)


@pytest.mark.parametrize("args,message", [
    (["--label", "Music", "--no-filter"], "contradict"),
    (["--label", "Sine wav"], "did you mean 'Sine wave'"),
])
def test_option_mistakes_before_the_model_loads(index, library, args, message):
    # --model points nowhere: had the model been loaded first, the error would be about the model
    out = cli("query", library / "tones" / "a440.wav", "--index", index, "--model", "/no/model", *args, code=1)
    assert message in out


def test_folder_empty_file_and_broken_link_as_clips(index, tmp_path):
    assert "is a folder, not a clip" in cli("query", tmp_path, "--index", index, code=1)
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty file" in cli("query", tmp_path / "empty.wav", "--index", index, code=1)
    (tmp_path / "link.wav").symlink_to(tmp_path / "gone.wav")
    assert "broken symlink" in cli("query", tmp_path / "link.wav", "--index", index, code=1)


def test_empty_index_is_called_empty(library, tmp_path):
    from audiosearch.collection import Collection

    Collection(tmp_path / "idx", create=True).close()
    out = cli("query", library / "tones" / "a440.wav", "--index", tmp_path / "idx", code=1)
    assert "holds no segments yet" in out


# -- 4. light commands stay light ---------------------------------------------
@pytest.mark.parametrize("command", ["info", "labels", "export"])
def test_read_only_commands_do_not_import_torch(index, tmp_path, command):
    extra = ["-o", str(tmp_path / "f.npz")] if command == "export" else []
    code = (f"import sys; from audiosearch.cli import app; "
            f"app({[command, '--index', str(index), *extra]!r}, standalone_mode=False); "
            f"sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_query_help_explains_the_default_filter():
    out = cli("query", "--help", env={"COLUMNS": "80"})
    text = " ".join(out.split())
    assert "filtered by the clip's top predicted label" in text and "'audiosearch labels'" in text
    assert "<bool>" not in out and "--k " not in out and "-k N" in out


# -- 7. refusals and file identity --------------------------------------------
def test_other_hop_on_an_existing_index_is_refused(library, tiny_model, tmp_path):
    index = tmp_path / "idx"
    cli("ingest", library / "tones", "--index", index, "--model", tiny_model)
    out = cli("ingest", library / "noise", "--index", index, "--hop", "5", code=1)
    assert "cuts segments every 10.24 s, not 5 s" in out
    cli("ingest", library / "noise", "--index", index, "--hop", "10.24")


def test_symlink_and_target_are_indexed_once(library, tiny_model, tmp_path):
    lib = shutil.copytree(library / "tones", tmp_path / "lib")
    (lib / "alias.wav").symlink_to(lib / "a440.wav")
    summary = json.loads(cli("ingest", lib, "--index", tmp_path / "idx", "--model", tiny_model, "--json"))
    assert summary["added"] == 2
    paths = {row["path"] for row in json.loads(cli("query", lib / "a440.wav", "--index", tmp_path / "idx",
                                                       "--json", "--no-filter"))["hits"]}
    assert str(lib / "a440.wav") in paths and str(lib / "alias.wav") not in paths


def test_progress_bar_fits_80_columns():
    from audiosearch.embedder import FileEmbedding
    from audiosearch.render import IngestBar

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with IngestBar(console) as bar:
        bar.start(12345)
        bar.update(FileEmbedding(None, "x.wav", "ok", duration=3600.0))
    last = [line for line in buf.getvalue().replace("\r", "\n").splitlines() if "ETA" in line][-1]
    assert len(last.rstrip()) <= 80 and last.rstrip()[-7:].count(":") == 2  # ETA h:mm:ss shown whole


# -- doctor's wording ---------------------------------------------------------
@pytest.fixture
def own_index(library, tiny_model, tmp_path) -> tuple[Path, Path]:
    lib = shutil.copytree(library / "tones", tmp_path / "lib")
    cli("ingest", lib, "--index", tmp_path / "idx", "--model", tiny_model)
    return lib, tmp_path / "idx"


def test_doctor_calls_a_hidden_file_unreadable_and_passes(own_index, monkeypatch):
    import audiosearch.doctor as doctor_module

    lib, index = own_index
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # as a folder without read permission looks to a non-root user
        if str(path).startswith(str(lib)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(doctor_module.os, "stat", stat)
    monkeypatch.setattr(doctor_module.os, "lstat", stat)
    out = cli("doctor", "--index", index)
    assert "2 indexed files cannot be checked" in out and "gone from disk" not in out


def test_doctor_says_when_nothing_is_fixable(own_index):
    lib, index = own_index
    (lib / "a440.wav").unlink()
    out = cli("doctor", "--index", index, code=1)
    assert "gone from disk" in out and "--repair cannot fix these" in out and "marked fixable" not in out


def test_doctor_says_what_a_query_does_about_a_missing_faiss_file(own_index):
    _, index = own_index
    (index / "vectors.faiss").unlink()
    out = cli("doctor", "--index", index, code=1)
    assert "the next query rebuilds it from SQLite and saves it" in " ".join(out.split())


def test_lock_message_names_the_holder(own_index):
    lib, index = own_index
    hold = ("import sys, time; from audiosearch.collection import Collection; c = Collection(sys.argv[1]); "
            "w = c.writing(); w.__enter__(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(index)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        out = cli("ingest", lib, "--index", index, code=1)
        assert f"(pid {holder.pid}) is writing to" in out
    finally:
        holder.kill()
        holder.wait()


# -- 6. formats libsndfile cannot read ----------------------------------------
def encode(path: Path, samples, rate: int, codec: str) -> Path:
    """Write a mono float signal with FFmpeg's encoders (PyAV, a test dependency)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("name,codec,rate", [("white.m4a", "aac", None), ("white.webm", "libopus", 48000)])
def test_aac_and_webm_are_decoded_and_found(index, library, tmp_path, name, codec, rate):
    import soundfile as sf
    import soxr

    data, source_rate = sf.read(library / "noise" / "white.flac", dtype="float32")
    if rate:
        data = soxr.resample(data, source_rate, rate)
    clip = encode(tmp_path / name, data, rate or source_rate, codec)
    hits = json.loads(cli("query", clip, "--index", index, "--json", "--no-filter"))["hits"]
    assert hits[0]["path"] == str(library / "noise" / "white.flac")


def test_container_without_ffmpeg_is_named(library, tiny_model, tmp_path, monkeypatch, request):
    import audiosearch.containers as containers

    lib = shutil.copytree(library / "tones", tmp_path / "lib")
    encode(lib / "song.m4a", [0.1] * 16000, 16000, "aac")  # with PyAV, before it is hidden
    request.getfixturevalue("without_pyav")
    monkeypatch.setattr(containers.shutil, "which", lambda name: None)
    summary = json.loads(cli("ingest", lib, "--index", tmp_path / "idx", "--model", tiny_model, "--workers", "0",
                             "--json", code=3))
    assert summary["failed"] == [{"path": str(lib / "song.m4a"),
                                  "error": "needs ffmpeg to decode M4A (apt install ffmpeg, or pip install av)"}]
    errors = json.loads(cli("info", "--index", tmp_path / "idx", "--errors", "--json"))["errors"]
    assert [e["path"] for e in errors] == [str(lib / "song.m4a")]


# -- 8. the default index -----------------------------------------------------
def test_default_index_is_per_user_and_the_old_one_is_still_read(library, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIOSEARCH_INDEX", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    cli("ingest", library / "tones", "--model", tiny_model)
    assert (tmp_path / "data" / "audiosearch" / "default" / "audiosearch.db").exists()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert json.loads(cli("info", "--json"))["files"] == {"ok": 2}
    cli("ingest", library / "clicks", "--index", "indexes/default", "--model", tiny_model)
    result = runner.invoke(app, ["info", "--json"])
    assert json.loads(result.stdout)["files"] == {"ok": 1} and result.stderr == ""  # --json: no note
    result = runner.invoke(app, ["labels"])
    assert "using ./indexes/default, the old default index" in result.stderr


# -- 9. the README's quick start, run as written ------------------------------
def test_readme_quick_start_runs_as_written_and_prints_what_it_shows(tmp_path):
    from tests.demo import README, comparable, quick_start_commands, readme_block, run_quick_start

    text = README.read_text()
    start, end = readme_block(text)
    commands = quick_start_commands(text)
    assert commands[0] == "audiosearch ingest library --model tiny-ast"
    fresh = run_quick_start(commands, tmp_path)
    assert comparable(fresh) == comparable(text[start:end]), "README drifted: run `python -m tests.demo --readme`"


def test_embed_files_expands_folders(library, tiny_model):
    from audiosearch import Embedder

    embedder = Embedder(str(tiny_model), device="cpu", precision="fp32", workers=0)
    results = list(embedder.embed_files([library / "tones", library / "noise" / "white.flac"]))
    assert sorted(Path(r.path).name for r in results) == ["a440.wav", "e660.flac", "white.flac"]
    assert all(r.status == "ok" and r.segments for r in results)


def test_explain_shows_each_distinct_plan_once(index, library):
    out = cli("query", library / "music" / "mixed_40s.wav", "--index", index, "--no-filter", "--explain")
    assert out.count("strategy:") == 1 and "4x strategy:" in out and "4 searches" in out
