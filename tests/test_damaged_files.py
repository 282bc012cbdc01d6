"""Damaged index files: the derived FAISS file is rebuilt, never trusted; a damaged database is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audiosearch import synthetic as syn
from audiosearch.cli import app
from audiosearch.ingest import ingest

from .conftest import write

# Every damaged variant of vectors.faiss, tried in one subprocess: a native crash or a hang ends it, and the
# test sees that. Each case must raise IndexCorrupt from VectorIndex.load (nothing else), and
# Collection.load_index must then serve exactly SQLite's vectors (rebuilt) and save a sound file again.
PROBE = """
import json, random, sys
from pathlib import Path
import numpy as np
from audiosearch.collection import Collection
from audiosearch.index import IndexCorrupt, VectorIndex

index = Path(sys.argv[1])
path = index / "vectors.faiss"
good = path.read_bytes()
rng = random.Random(0)
cases = [("truncated", cut, good[:cut]) for cut in range(0, len(good), 4096)] + [("truncated", len(good) - 1, good[:-1])]
for n in range(int(sys.argv[2])):
    at = rng.randrange(len(good)) if n % 4 else rng.randrange(min(200, len(good)))  # a quarter in header + metadata
    cases.append(("flipped", at, good[:at] + bytes([good[at] ^ (1 << rng.randrange(8))]) + good[at + 1:]))
outcomes = {}
for kind, at, data in cases:
    path.write_bytes(data)
    try:
        VectorIndex.load(path)
        outcome = "loaded"
    except IndexCorrupt:
        outcome = "corrupt"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    collection = Collection(index)
    vectors, _ = collection.load_index()
    ids = collection.store.ids()
    served = np.array_equal(vectors.ids(), ids) and np.array_equal(vectors.reconstruct(ids), collection.store.vectors(ids))
    healed = VectorIndex.load(path).generation == collection.store.generation
    collection.close()
    key = f"{outcome} served={served} healed={healed}"
    outcomes[key] = outcomes.get(key, 0) + 1
print(json.dumps({"cases": len(cases), "outcomes": outcomes}))
"""


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    for i in range(40):
        write(root / "lib" / f"{i:02d}.wav", syn.tone(150 + 20 * i, 3.0) if i % 2 else syn.noise(3.0, seed=i), 16000)
    ingest([root / "lib"], index_dir=root / "idx", model=str(tiny_model), device="cpu", precision="fp32")
    return root / "idx"


def test_every_truncation_and_byte_flip_is_caught_and_rebuilt(built):
    flips = 120
    size = (built / "vectors.faiss").stat().st_size
    proc = subprocess.run([sys.executable, "-c", PROBE, str(built), str(flips)], capture_output=True, timeout=300)
    assert proc.returncode == 0, f"probe died ({proc.returncode}): {proc.stderr.decode()[-2000:]}"
    result = json.loads(proc.stdout)
    assert result["cases"] == -(-size // 4096) + 1 + flips  # every 4 KiB boundary, the last byte, the flips
    assert result["outcomes"] == {"corrupt served=True healed=True": result["cases"]}, result


@pytest.mark.parametrize("damage", ["truncated", "zeroed pages", "not a database"])
def test_damaged_database_is_one_line_pointing_at_doctor(built, tmp_path, damage, tiny_model):
    index = tmp_path / "idx"
    index.mkdir()
    db = (built / "audiosearch.db").read_bytes()
    page = 4096
    data = {"truncated": db[: len(db) // 3], "zeroed pages": db[:page] + bytes(len(db) - page),
            "not a database": os.urandom(len(db))}[damage]
    (index / "audiosearch.db").write_bytes(data)
    clip = next((built.parent / "lib").iterdir())
    for args in (["info"], ["labels"], ["query", clip, "--model", tiny_model], ["ingest", built.parent / "lib"]):
        result = CliRunner().invoke(app, [*map(str, args), "--index", str(index)])
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
        assert "damaged" in result.output and "audiosearch doctor" in result.output
    result = CliRunner().invoke(app, ["doctor", "--index", str(index)])
    assert result.exit_code == 1 and "Traceback" not in result.output
