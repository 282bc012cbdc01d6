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


# The same for the print lookup (prints.json and its run), also in one subprocess. Damage where a
# wrong value would send matches to the wrong file or (un)hide one (the header, the fingerprint ids,
# the manifest) and every truncation must be caught on load; a flipped byte among the packed entries
# (checked by doctor only) may load, but no case may change what a clip matches.
PRINTS_PROBE = """
import json, random, struct, sys
from pathlib import Path
from audiosearch.audio import decode
from audiosearch.collection import Collection
from audiosearch.match import lookup as L
from audiosearch.match.matcher import Matcher

index, flips = Path(sys.argv[1]), int(sys.argv[2])
clips = [decode(Path(p)).samples for p in sys.argv[3:]]

def matches():
    collection = Collection(index)
    try:
        m = Matcher(collection, collection.load_prints())
        return [[(a.file_id, round(a.start, 2), round(a.end, 2)) for a in m.match_samples(x)] for x in clips]
    finally:
        collection.close()

manifest = index / L.MANIFEST
run = next(index.glob(L.RUN_GLOB))
good_run, good_manifest = run.read_bytes(), manifest.read_bytes()
clean = matches()
n_ids = struct.unpack_from("<Q", good_run, 8)[0]
ids_end = L._HEADER.size + 8 * n_ids
rng = random.Random(0)
flip = lambda data, at: data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
cases = [("run truncated", good_run[:cut], good_manifest) for cut in range(0, len(good_run), 4096)]
cases.append(("run truncated", good_run[:-1], good_manifest))
checked = [at for at in range(ids_end) if not 32 <= at < 40]  # all but the body's checksum, which doctor reads
cases += [("run header or ids flipped", flip(good_run, rng.choice(checked)), good_manifest) for _ in range(flips)]
cases += [("run entries flipped", flip(good_run, rng.randrange(ids_end, len(good_run))), good_manifest) for _ in range(flips)]
cases += [("manifest flipped", good_run, flip(good_manifest, rng.randrange(len(good_manifest)))) for _ in range(flips)]
outcomes = {}
for region, run_bytes, manifest_bytes in cases:
    for old in index.glob(L.RUN_GLOB):
        old.unlink()
    run.write_bytes(run_bytes)
    manifest.write_bytes(manifest_bytes)
    try:
        L.load(index)
        outcome = "loaded"
    except L.LookupCorrupt:
        outcome = "caught"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    key = f"{region}: {outcome}, served {'the same' if matches() == clean else 'OTHER'}"
    outcomes[key] = outcomes.get(key, 0) + 1
print(json.dumps({"cases": len(cases), "clean": sum(map(len, clean)), "outcomes": outcomes}))
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


def test_damaged_print_lookup_is_caught_or_harmless_never_a_wrong_match(built):
    clips = [str(built.parent / "lib" / f"{i:02d}.wav") for i in (0, 4)]  # noise: found by fingerprint
    proc = subprocess.run([sys.executable, "-c", PRINTS_PROBE, str(built), "40", *clips], capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, f"probe died ({proc.returncode}): {proc.stderr.decode()[-2000:]}"
    result = json.loads(proc.stdout)
    assert result["clean"] >= 2
    outcomes = result["outcomes"]
    for key in outcomes:
        region, rest = key.split(": ", 1)
        assert rest.endswith("served the same"), (key, outcomes)
        assert region == "run entries flipped" or rest.startswith("caught"), (key, outcomes)
    assert sum(outcomes.values()) == result["cases"]


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
