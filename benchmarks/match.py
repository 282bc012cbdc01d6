"""Matching benchmark: edited queries against a generated library, ours beside audfprint and fpcalc.

    python -m benchmarks.match build --out DIR [--seed 11] [--per-edit 20]
    python -m benchmarks.match run --set DIR [--audfprint DIR]

Needs sox (with libsox-fmt-all), ffmpeg, espeak-ng, fluidsynth with a GM soundfont, and for the
side-by-side columns a checkout of dpwe/audfprint and Chromaprint's fpcalc (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.match", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="make the test set: library, edited queries, manifest.json")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=11)
    b.add_argument("--per-edit", type=int, default=20, help="queries per edit row")
    b.add_argument("--jobs", type=int, default=2)
    r = sub.add_parser("run", help="ingest the set's library, match every query, print the tables")
    r.add_argument("--set", type=Path, required=True, help="a folder made by `build`")
    r.add_argument("--audfprint", type=Path, help="a checkout of github.com/dpwe/audfprint to run beside ours")
    r.add_argument("--audfprint-python", default="python3",
                   help="interpreter with audfprint's requirements (numpy scipy docopt joblib psutil)")
    r.add_argument("--skip-synthetic", action="store_true", help="leave out the 1,000 / 10,000 h lookup timings")
    r.add_argument("--work", type=Path, help="scratch folder for indexes and the report (default: SET/_run)")
    r.add_argument("--no-lock", action="store_true",
                   help="accuracy only: do not wait for the benchmark lock; run at nice 19; times are not timings")
    args = ap.parse_args(argv)
    if args.command == "build":
        from .matchset.build import build
        build(args.out, seed=args.seed, per_edit=args.per_edit, jobs=args.jobs)
    else:
        from .matchset.run import run
        run(args.set, args.audfprint, args.audfprint_python, args.skip_synthetic, args.work, not args.no_lock)


if __name__ == "__main__":
    main()
