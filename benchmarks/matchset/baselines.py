"""The reference systems run on the same set: audfprint (landmark pairs, 2014) and Chromaprint's fpcalc.

audfprint is not vendored: the runner is given a checkout (`--audfprint DIR`, from github.com/dpwe/audfprint)
and a Python that has its requirements (numpy scipy docopt joblib psutil). It is driven through its own
`setup_analyzer` / `setup_matcher` / `HashTable`, with the CLI's defaults, so each query is timed alone and
the database is loaded once, as our Matcher is.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDFPRINT_DEFAULTS = ["--density", "20", "--fanout", "3"]  # the CLI's defaults, stated for the record

_DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import docopt, audfprint, hash_table
args = docopt.docopt(audfprint.USAGE, argv=["match", "-d", sys.argv[2], "-R", "-x", "1", *sys.argv[4:]])
args["--maxtimebits"] = hash_table._bitsfor(int(args["--maxtime"]))
analyzer, matcher = audfprint.setup_analyzer(args), audfprint.setup_matcher(args)
ht = hash_table.HashTable(sys.argv[2])
hop = analyzer.n_hop / analyzer.target_sr
for line in open(sys.argv[3]):  # not stdin: audfprint's ffmpeg inherits stdin and would eat from it
    q = line.rstrip("\n")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        rs, dur, nhash = matcher.match_file(analyzer, ht, q)
    except Exception as e:  # audfprint's reader failing on one file: reported, not fatal
        print(json.dumps({"query": q, "error": f"{type(e).__name__}: {e}"}), flush=True)
        continue
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    hits = [{"name": ht.names[int(r[0])], "aligned": int(r[1]), "raw": int(r[3]),
             "qstart": float(r[5]) * hop, "qend": float(r[6]) * hop, "offset": float(r[2]) * hop} for r in rs]
    print(json.dumps({"query": q, "wall": wall, "cpu": cpu, "hashes": int(nhash), "hits": hits}), flush=True)
"""


@dataclass
class Audfprint:
    """A checkout of dpwe/audfprint and the interpreter to run it with."""

    checkout: Path
    python: str

    def version(self) -> str:
        try:
            rev = subprocess.run(["git", "-C", str(self.checkout), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
        except OSError:
            rev = ""
        return f"dpwe/audfprint {rev or '(no git)'}, density 20, fanout 3 (CLI defaults)"

    def check(self) -> str | None:
        """None when usable, else one line saying what is missing."""
        if not (self.checkout / "audfprint.py").is_file():
            return f"no audfprint.py in {self.checkout} (clone github.com/dpwe/audfprint there)"
        p = subprocess.run([self.python, "-c", "import numpy, scipy, docopt, joblib, psutil"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return (f"{self.python} lacks audfprint's requirements: pip install numpy scipy docopt joblib psutil "
                    f"({(p.stderr.strip().splitlines() or ['?'])[-1]})")
        return None

    def ingest(self, files: list[Path], db: Path) -> dict:
        """`audfprint new` on the library, one process; wall and CPU (with ffmpeg's) seconds."""
        listing = db.with_suffix(".list")
        listing.write_text("".join(f"{f}\n" for f in files))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run([self.python, str(self.checkout / "audfprint.py"), "new", "-d", str(db), "-l",
                            str(listing), "-H", "1", "-C", *AUDFPRINT_DEFAULTS], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise RuntimeError(f"audfprint new failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"wall": wall, "cpu": cpu, "bytes": db.stat().st_size}

    def match(self, db: Path, queries: list[Path]) -> dict[str, dict]:
        """query path -> {"wall", "cpu", "hits": [{"name", "offset", "qstart", "qend", "aligned", "raw"}]}."""
        listing = db.with_suffix(".queries")
        listing.write_text("".join(f"{q}\n" for q in queries))
        p = subprocess.run([self.python, "-c", _DRIVER, str(self.checkout), str(db), str(listing)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"audfprint match failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        out = {}
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                if "error" in r:
                    print(f"audfprint: {r['query']}: {r['error']} (counted as no verdict)")
                out[r["query"]] = r
        return out


# ----------------------------------------------------------------------------- Chromaprint
FPCALC_BER = 0.35  # bit error rate at or below which two fpcalc prints are called the same recording
FPCALC_SLIDE = 8  # items (~1 s) of misalignment tried each way


def fpcalc_version() -> str | None:
    if shutil.which("fpcalc") is None:
        return None
    p = subprocess.run(["fpcalc", "-version"], capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip()


def fpcalc(path: Path) -> np.ndarray:
    """Chromaprint's raw fingerprint (32-bit items, ~8 per second); empty for sounds too short to print."""
    p = subprocess.run(["fpcalc", "-raw", "-length", "0", str(path)], capture_output=True, text=True,
                       env={**os.environ, "AV_LOG_FORCE_NOCOLOR": "1"})
    for line in p.stdout.splitlines():
        if line.startswith("FINGERPRINT=") and len(line) > 12:
            return np.array([int(v) for v in line[12:].split(",")], dtype=np.uint32)
    return np.zeros(0, dtype=np.uint32)


_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bit_error_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Lowest bit error rate of `a` against `b` over small shifts, on overlaps of at least half the shorter."""
    best = 1.0
    need = max(3, min(len(a), len(b)) // 2)
    for s in range(-FPCALC_SLIDE, FPCALC_SLIDE + 1):
        x = a[max(0, s):]
        y = b[max(0, -s):]
        n = min(len(x), len(y))
        if n < need:
            continue
        bits = _POP[(x[:n] ^ y[:n]).view(np.uint8)].sum()
        best = min(best, float(bits) / (32 * n))
    return best
