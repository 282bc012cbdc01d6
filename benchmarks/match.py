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
    args = ap.parse_args(argv)
    if args.command == "build":
        from .matchset.build import build
        build(args.out, seed=args.seed, per_edit=args.per_edit, jobs=args.jobs)


if __name__ == "__main__":
    main()
