"""Scan benchmark: a generated 2-hour recording with 50 planted library excerpts, edited.

    python -m benchmarks.scan [--hours 2] [--plants 50] [--library 300] [--seed 0] [--work DIR] [--no-reference]

A library of generated sounds (plucked melodies, sweeps under envelopes, espeak-ng
speech; 3-30 s each) is
ingested with the tiny random AST (the embeddings are not used: `scan` matches
fingerprints only). The recording is other sounds of the same generators with other
seeds (nothing in the library) under pink noise, written minute by minute, with 50
excerpts of library files (3-20 s, from anywhere in the file) planted at random
places. Each excerpt goes through one edit, in turn: none, speed ±5 % (sox speed:
tempo and pitch), pitch ±2 semitones (sox pitch), white noise at 10 dB SNR, MP3 at
64 kbit/s.

Printed: recall and precision of the planted occurrences (found: same file, half
the planted range covered), the error of the reported recording range and file
range, the matching work's pace (× real time: fingerprinting + lookup + verify)
and the whole scan's (decode included), and the scan process's peak memory. Beside
it, the reference a user has without `scan`: the whole recording as one `query`
clip (`Matcher.match_samples`), which holds the recording in memory and returns at
most one placement per library file.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from audiosearch import synthetic as syn

from .matchset.sources import OUTSIDE_SENTENCES, SENTENCES, speech

RATE = 16000
EDITS = ["none", "speed", "pitch", "noise", "codec"]
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def generated(kind: str, seconds: float, seed: int, tmp: Path, sentences: list[str] = SENTENCES) -> np.ndarray:
    """About `seconds` of one generator's sound: plucked melodies, sweeps under envelopes, or speech
    (espeak-ng, as the matching benchmark makes it); exactly int(seconds * RATE) samples."""
    n = int(seconds * RATE)
    if kind == "speech":
        rng = random.Random(seed)
        path = tmp / f"speech_{seed}.wav"
        x = np.zeros(0, np.float32)
        while len(x) < n:
            speech(path, " ".join(rng.sample(sentences, rng.randint(1, 3))), rng.choice(VOICES), rng)
            y, rate = sf.read(path, dtype="float32")
            x = np.concatenate([x, soxr.resample(y, rate, RATE).astype(np.float32)])
        return x[:n]
    x = (syn.melody if kind == "melody" else syn.bursts)(seconds, seed=seed)[:n]
    return np.pad(x, (0, n - len(x)))


KINDS = ["melody", "bursts", "speech"]
VOICES = ["en", "en-us", "en-gb-x-rp", "en-029"]


def build_library(root: Path, n: int, rng: random.Random) -> list[dict]:
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            kind = KINDS[i % 3]
            seconds = round(rng.uniform(3, 30), 2)
            path = root / "library" / kind / f"{kind}_{i:04d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, generated(kind, seconds, 1000 + i, Path(tmp)), RATE)
            files.append({"path": str(path), "kind": kind, "seconds": seconds})
    return files


def _sox(x: np.ndarray, tmp: Path, *effect: str) -> np.ndarray:
    sf.write(tmp / "in.wav", x, RATE)
    subprocess.run(["sox", str(tmp / "in.wav"), str(tmp / "out.wav"), *effect], check=True, capture_output=True)
    return sf.read(tmp / "out.wav", dtype="float32")[0]


def edit(x: np.ndarray, kind: str, rng: random.Random, tmp: Path) -> tuple[np.ndarray, float, float, str]:
    """The edited excerpt, its truth (speed: library s per recording s; pitch factor) and a label."""
    if kind == "speed":
        factor = rng.choice([0.95, 1.05])
        return _sox(x, tmp, "speed", str(factor)), factor, factor, f"speed {factor}"
    if kind == "pitch":
        cents = rng.choice([-200, 200])
        return _sox(x, tmp, "pitch", str(cents)), 1.0, 2 ** (cents / 1200), f"pitch {cents:+d} cents"
    if kind == "noise":
        noise = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(len(x)).astype(np.float32)
        noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (10 / 10))
        return x + noise, 1.0, 1.0, "white noise 10 dB SNR"
    if kind == "codec":
        sf.write(tmp / "c.mp3", x, RATE, format="MP3", compression_level=0.9)  # ~64 kbit/s VBR at 16 kHz
        y = sf.read(tmp / "c.mp3", dtype="float32")[0]
        return y[: len(x)], 1.0, 1.0, "MP3 (libsndfile, VBR ~64 kbit/s)"
    return x, 1.0, 1.0, "none"


def background(minute: int, seed: int, tmp: Path) -> np.ndarray:
    """One minute of sounds that are in no library file (other seeds; sentences no library file speaks), under pink noise."""
    rng = np.random.default_rng(seed * 10_000 + minute)
    x = 0.4 * generated(KINDS[minute % 3], 60, 500_000 + seed * 10_000 + minute, tmp, OUTSIDE_SENTENCES)
    x += syn.noise(60, seed=int(rng.integers(1 << 30)), amp=0.03, pink=True)
    return x.astype(np.float32)


def build_recording(root: Path, library: list[dict], hours: float, plants: int, rng: random.Random,
                    seed: int) -> tuple[Path, list[dict]]:
    total = int(hours * 3600)
    slots = sorted(rng.sample(range(2, total // 30 - 1), plants))  # one plant per 30 s slot at most
    truth: list[dict] = []
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, slot in enumerate(slots):
            f = rng.choice(library)
            seconds = min(f["seconds"], rng.uniform(3, 20))
            start = rng.uniform(0, f["seconds"] - seconds)
            source = sf.read(f["path"], dtype="float32")[0]
            x = source[int(start * RATE): int((start + seconds) * RATE)]
            kind = EDITS[n % len(EDITS)]
            y, speed, pitch, label = edit(x, kind, rng, Path(tmp))
            at = slot * 30 + rng.uniform(0, 30 - len(y) / RATE)
            first = int(at * RATE)
            truth.append({"path": f["path"], "start": at, "end": at + len(y) / RATE, "file_start": start,
                          "file_end": start + seconds, "speed": speed, "pitch": pitch, "edit": label})
            pending.setdefault(first // (60 * RATE), []).append((first, y.astype(np.float32)))
    path = root / "recording.flac"
    carry: list[tuple[int, np.ndarray]] = []  # plants running past the end of their minute
    with sf.SoundFile(path, "w", RATE, 1, format="FLAC") as out, tempfile.TemporaryDirectory() as tmp:
        for minute in range(total // 60):
            x = background(minute, seed, Path(tmp))
            base = minute * 60 * RATE
            todo, carry = carry + pending.get(minute, []), []
            for first, y in todo:
                lo, hi = first - base, first - base + len(y)
                x[max(lo, 0): min(hi, len(x))] = y[max(0, -lo): len(y) - max(0, hi - len(x))]
                if hi > len(x):
                    carry.append((first, y))
            out.write(np.clip(x, -1, 1))
    return path, truth


SCAN_PROCESS = """
import json, re, sys, time
from audiosearch.match.scan import scan
t = time.perf_counter()
result = scan(sys.argv[1], index_dir=sys.argv[2])
wall = time.perf_counter() - t
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({**result.to_dict(), "wall": wall, "realtime": result.realtime, "peak_mib": hwm / 1024}))
"""

REFERENCE_PROCESS = """
import json, re, sys, time
from audiosearch.audio import decode
from audiosearch.match import Matcher
t = time.perf_counter()
samples = decode(sys.argv[1]).samples
with Matcher.open(sys.argv[2]) as m:
    t1 = time.perf_counter()
    hits = m.match_samples(samples)
    work = time.perf_counter() - t1
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
occ = [{"path": h.path, "start": h.query_start, "end": h.query_end, "file_start": h.start, "file_end": h.end}
       for h in hits]
print(json.dumps({"occurrences": occ, "wall": time.perf_counter() - t, "work": work, "peak_mib": hwm / 1024,
                  "duration": len(samples) / 16000}))
"""


def evaluate(found: list[dict], truth: list[dict]) -> dict:
    """Recall/precision (same file, half of the planted range covered) and range errors of the hits."""
    used: set[int] = set()
    errors, file_errors, hits = [], [], 0
    for t in truth:
        best = None
        for i, o in enumerate(found):
            overlap = min(o["end"], t["end"]) - max(o["start"], t["start"])
            if o["path"] == t["path"] and overlap >= 0.5 * (t["end"] - t["start"]) and i not in used:
                best = i
                break
        t["found"] = best is not None
        if best is None:
            continue
        used.add(best)
        hits += 1
        o = found[best]
        errors += [abs(o["start"] - t["start"]), abs(o["end"] - t["end"])]
        file_errors += [abs(o["file_start"] - t["file_start"]), abs(o["file_end"] - t["file_end"])]
    correct = sum(1 for i, o in enumerate(found) if i in used or any(
        o["path"] == t["path"] and min(o["end"], t["end"]) > max(o["start"], t["start"]) for t in truth))
    return {
        "recall": hits / len(truth), "precision": correct / len(found) if found else None, "found": len(found),
        "false": len(found) - correct, "time_error_median": float(np.median(errors)) if errors else None,
        "time_error_p90": float(np.percentile(errors, 90)) if errors else None,
        "within_0.1s": float(np.mean(np.array(errors) <= 0.1)) if errors else None,
        "file_error_median": float(np.median(file_errors)) if file_errors else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scan", description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--plants", type=int, default=50)
    ap.add_argument("--library", type=int, default=300, help="library files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep the library, index, recording and truth here, and reuse them "
                    "when there (default: a temp dir)")
    ap.add_argument("--no-reference", action="store_true", help="skip the whole-recording query")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rng = random.Random(args.seed)
        t0 = time.perf_counter()
        built = root / "truth.json"
        if built.exists():  # a --work folder built before with the same options
            recording, truth = root / "recording.flac", json.loads(built.read_text())
        else:
            library = build_library(root, args.library, rng)
            recording, truth = build_recording(root, library, args.hours, args.plants, rng, args.seed)
            built.write_text(json.dumps(truth))
            print(f"built {len(library)} library files and a {args.hours:g} h recording with {len(truth)} plants "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
        index = root / "index"
        if not (index / "audiosearch.db").exists():
            syn.save_random_checkpoint(root / "tiny-ast", **TINY)
            subprocess.run([sys.executable, "-m", "audiosearch", "ingest", str(root / "library"), "--index",
                            str(index), "--model", str(root / "tiny-ast"), "--device", "cpu", "--json"],
                           check=True, capture_output=True)
        ours = json.loads(subprocess.run([sys.executable, "-c", SCAN_PROCESS, str(recording), str(index)],
                                         check=True, capture_output=True, text=True).stdout)
        report = {"ours": {**evaluate(ours["occurrences"], truth), "duration": ours["duration"],
                           "matching_x_realtime": ours["realtime"],
                           "scan_x_realtime": ours["duration"] / ours["wall"], "peak_mib": ours["peak_mib"],
                           "timings": ours["timings"]}}
        report["per_edit"] = {e: float(np.mean([t["found"] for t in truth if t["edit"].split()[0] == e]))
                              for e in sorted({t["edit"].split()[0] for t in truth})}
        if not args.no_reference:
            ref = json.loads(subprocess.run([sys.executable, "-c", REFERENCE_PROCESS, str(recording), str(index)],
                                            check=True, capture_output=True, text=True).stdout)
            truth_copy = [dict(t) for t in truth]
            report["reference"] = {**evaluate(ref["occurrences"], truth_copy),
                                   "matching_x_realtime": ref["duration"] / ref["work"],
                                   "scan_x_realtime": ref["duration"] / ref["wall"], "peak_mib": ref["peak_mib"]}
        report["missed"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in t.items() if k != "found"}
                            for t in truth if not t["found"]]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(render(report, args))


def render(report: dict, args) -> str:
    systems = ["ours"] + (["reference"] if "reference" in report else [])
    names = {"ours": "scan (15 s windows)", "reference": "one query of the whole recording"}
    rows = [("recall of planted occurrences", "recall", "{:.2f}"), ("precision", "precision", "{:.2f}"),
            ("occurrences reported", "found", "{}"), ("false occurrences", "false", "{}"),
            ("recording range error, median s", "time_error_median", "{:.3f}"),
            ("recording range error, p90 s", "time_error_p90", "{:.3f}"),
            ("range ends within 0.1 s", "within_0.1s", "{:.2f}"),
            ("file range error, median s", "file_error_median", "{:.3f}"),
            ("matching work, x real time", "matching_x_realtime", "{:.0f}"),
            ("whole run (decode incl.), x real time", "scan_x_realtime", "{:.0f}"),
            ("peak memory, MiB", "peak_mib", "{:.0f}")]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{args.hours:g} h recording, {args.plants} plants, {args.library} library files, seed {args.seed}",
             "".ljust(width) + "".join(names[s].rjust(34) for s in systems)]
    for label, key, fmt in rows:
        cells = [report[s].get(key) for s in systems]
        lines.append(label.ljust(width) + "".join(("-" if c is None else fmt.format(c)).rjust(34) for c in cells))
    if "reference" in report and report["reference"]["matching_x_realtime"]:
        ratio = report["ours"]["matching_x_realtime"] / report["reference"]["matching_x_realtime"]
        lines.append(f"matching pace, scan / reference: {ratio:.2f}x")
    lines.append("recall per edit: " + ", ".join(f"{e} {r:.2f}" for e, r in report["per_edit"].items()))
    for m in report["missed"]:
        lines.append(f"  missed: {Path(m['path']).name} {m['file_start']:.1f}-{m['file_end']:.1f} s at "
                     f"{m['start']:.1f} s ({m['edit']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
