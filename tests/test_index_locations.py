"""Awkward index locations: read-only, a file instead of a folder; and the durable mode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.ingest import ingest
from audiosearch.store import Store

from .conftest import write


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture
def read_only_index(tiny_model, tmp_path):
    """An index whose folder is 555 and files 444; for root (whom modes do not stop), also a read-only mount."""
    lib, index = tmp_path / "lib", tmp_path / "idx"
    clip = write(lib / "tone.wav", syn.tone(440, 3.0), 16000)
    write(lib / "noise.wav", syn.noise(3.0), 16000)
    ingest([lib], index_dir=index, model=str(tiny_model), device="cpu", precision="fp32")
    for f in index.iterdir():
        f.chmod(0o444)
    index.chmod(0o555)
    view = index
    if os.geteuid() == 0:
        view = tmp_path / "ro"
        view.mkdir()
        mounted = subprocess.run(["mount", "--bind", str(index), str(view)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(view)]).returncode != 0:
            pytest.skip("running as root without mount: a read-only index cannot be made here")
    try:
        yield view, clip
    finally:
        if view != index:
            subprocess.run(["umount", str(view)], check=True)
        index.chmod(0o755)


def test_read_only_index_can_be_read(read_only_index, tiny_model):
    index, clip = read_only_index
    before = sorted(p.name for p in index.iterdir())
    code, out = cli("info", "--index", index, "--json")
    assert code == 0 and json.loads(out)["segments"] == 2
    code, out = cli("labels", "--index", index, "--json")
    assert code == 0 and sum(row["segments"] for row in json.loads(out)) >= 2
    code, out = cli("query", clip, "--index", index, "--model", tiny_model, "--no-filter", "-k", "1", "--json")
    assert code == 0 and json.loads(out)["hits"][0]["path"] == str(clip)
    code, out = cli("export", "--index", index, "-o", clip.parent.parent / "out" / "f.npz", "--json")
    assert code == 0 and json.loads(out)["segments"] == 2
    code, out = cli("ingest", clip.parent, "--index", index)
    assert code == 1 and "read-only" in out and out.strip().count("\n") == 0
    assert sorted(p.name for p in index.iterdir()) == before


def test_index_naming_a_file_is_one_line(tmp_path, library):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("hello")
    for args in (["ingest", library], ["query", library / "tones" / "a440.wav"], ["info"], ["doctor"]):
        code, out = cli(*args, "--index", not_a_folder)
        assert code == 1 and "is a file" in out and out.strip().count("\n") == 0, out
    assert not_a_folder.read_text() == "hello"


def test_durable_mode_syncs_every_commit(tmp_path, monkeypatch):
    assert _synchronous(Store(tmp_path / "a", create=True)) == 1  # NORMAL
    assert _synchronous(Store(tmp_path / "b", create=True, durable=True)) == 2  # FULL
    monkeypatch.setenv("AUDIOSEARCH_DURABLE", "1")
    assert _synchronous(Store(tmp_path / "c", create=True)) == 2


def test_durable_flag_reaches_the_writer(tiny_model, tmp_path, monkeypatch):
    seen = []
    real = Store._prepare

    def spy(self, create):
        real(self, create)
        seen.append(_synchronous(self))

    monkeypatch.setattr(Store, "_prepare", spy)
    lib = tmp_path / "lib"
    write(lib / "tone.wav", syn.tone(440, 2.0), 16000)
    code, out = cli("ingest", lib, "--index", tmp_path / "idx", "--model", tiny_model, "--durable", "--json")
    assert code == 0, out
    assert len(seen) >= 2 and set(seen) == {2}  # the main thread's store and the writer thread's


def _synchronous(store: Store) -> int:
    return store.db.execute("PRAGMA synchronous").fetchone()[0]
