"""The library and index that the serve tests (API and browser) share: the test library, plus a file
browsers cannot play (AIFF), a file that fails to decode, and a secret outside the library."""

from __future__ import annotations

from pathlib import Path

import pytest

from audiosearch import synthetic as syn

from .conftest import make_library, write


@pytest.fixture(scope="session")
def serve_library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "library"
    make_library(root)
    write(root / "other" / "hum.aiff", syn.tone(120, 5, 22050), 22050, format="AIFF")
    (root / "other" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    return root


@pytest.fixture(scope="session")
def secret(tmp_path_factory) -> Path:
    """A file outside the library that the server must never send."""
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text("the server must never send this\n")
    return path


@pytest.fixture(scope="session")
def serve_index(serve_library, tiny_model, tmp_path_factory) -> Path:
    from audiosearch.ingest import ingest

    index = tmp_path_factory.mktemp("serve-index") / "idx"
    summary = ingest([serve_library], index_dir=index, model=str(tiny_model))
    assert [Path(p).name for p, _ in summary.failed] == ["broken.wav"]  # listed by the library overview
    return index
