"""Build the matching test set: a library of varied recordings, edited queries, non-member queries, a manifest.

    python -m benchmarks.match build --out DIR [--seed 11] [--per-edit 20] [--jobs 2]

Layout: DIR/library (what gets ingested), DIR/outside (audio kept out of the library: hard
negatives and mixing backgrounds), DIR/queries, DIR/manifest.json. Everything is drawn from
generators seeded by (seed, name), so a rebuild with the same seed and tools gives the same set.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from . import sources as S
from .edits import EDITS, _read_mono
from .tools import require_build_tools, run

# (edit, strengths): every edit at two strengths where it has one
ROWS: list[tuple[str, list[str]]] = [
    ("copy", ["-"]),
    ("mp3", ["128k", "64k"]),
    ("opus", ["48k", "24k"]),
    ("aac", ["128k", "64k"]),
    ("gsm", ["13k"]),
    ("gain", ["-10", "+6"]),
    ("white noise", ["20 dB", "10 dB"]),
    ("pink noise", ["20 dB", "10 dB"]),
    ("music mixed", ["10 dB", "5 dB"]),
    ("babble mixed", ["10 dB", "5 dB"]),
    ("shift", ["0.73 s", "2.31 s"]),
    ("telephone", ["300-3400", "400-3000"]),
    ("reverb", ["30", "70"]),
    ("speed", ["×0.95", "×1.05", "×0.9", "×1.1"]),
    ("tempo", ["×0.95", "×1.05", "×0.9", "×1.1"]),
    ("pitch", ["-100 ct", "+100 ct", "-200 ct", "+200 ct"]),
    ("excerpt", ["6 s", "3 s"]),
]
WHOLE_ROWS = [("copy", "-"), ("mp3", "64k"), ("aac", "128k"), ("gain", "-10")]  # whole files: fpcalc applies
SHORT_ROWS = [("copy", "-"), ("mp3", "128k"), ("gain", "-10"), ("white noise", "20 dB")]  # sounds < 1 s
NONMEMBER_EDITS = [("copy", "-"), ("copy", "-"), ("mp3", "64k"), ("white noise", "20 dB"), ("speed", "×1.05"),
                   ("pitch", "+100 ct"), ("tempo", "×0.95")]


@dataclass
class Job:
    """One recording to make: where it goes, its kind and group, and how."""

    rel: str
    kind: str
    group: str
    make: object  # callable(path) -> None


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def plan_recordings(seed: int, font: str) -> tuple[list[Job], list[Job]]:
    """The library's recordings and the outside ones (hard negatives, backgrounds)."""
    lib: list[Job] = []
    out: list[Job] = []
    g = _rng(seed, "plan")

    def speech_job(rel, text, voice, group, into):
        into.append(Job(rel, "speech", group, lambda p, t=text, v=voice, r=rel: S.speech(p, t, v, _rng(seed, r))))

    # speech: passages read by two library voices (hard negatives of each other) and a third voice outside
    for i in range(22):
        text = S.passage(g, 3, 9)
        va, vb, vc = g.sample(S.VOICES, 3)
        for v in (va, vb):
            speech_job(f"library/speech/p{i:02d}_{v}.wav", text, v, f"text{i}", lib)
        if i < 16:
            speech_job(f"outside/other_speaker/p{i:02d}_{vc}.wav", text, vc, f"text{i}", out)
    for i in range(22, 36):
        speech_job(f"library/speech/p{i:02d}.wav", S.passage(g, 3, 10), g.choice(S.VOICES), f"text{i}", lib)
    for lang, texts in S.FOREIGN.items():
        speech_job(f"library/speech/{lang}.wav", " ".join(texts), lang, f"lang-{lang}", lib)
        speech_job(f"library/speech/{lang}_f.wav", " ".join(reversed(texts)), f"{lang}+f3", f"lang-{lang}-f", lib)
    for i in range(6):  # unrelated speech outside: new passages, new voices
        text = " ".join(g.sample(S.OUTSIDE_SENTENCES, g.randint(3, 6)))
        speech_job(f"outside/unrelated/speech{i}.wav", text, g.choice(S.VOICES), f"out-speech{i}", out)

    # music: tunes played twice in the library (other instrument and tempo) and once more outside
    def music_job(rel, tune, prog, bass, bpm, acc, group, into, drums=True):
        into.append(Job(rel, "music", group,
                        lambda p, r=rel: S.music(p, tune, prog, bass, bpm, font, _rng(seed, r), acc, drums)))

    for i in range(44):
        seconds = g.uniform(10, 55)
        bpm_a = g.uniform(70, 160)
        tune = S.make_tune(_rng(seed, f"tune{i}"), seconds * bpm_a / 60)
        pa, pb, pc = g.sample(S.PROGRAMS, 3)
        bass = g.choice(S.BASSES)
        acc = g.random() < 0.5
        music_job(f"library/music/t{i:02d}a.wav", tune, pa, bass, bpm_a, acc, f"tune{i}", lib)
        if i < 24:
            music_job(f"library/music/t{i:02d}b.wav", tune, pb, bass, bpm_a * g.uniform(0.8, 1.25), not acc,
                      f"tune{i}", lib)
        if i < 16:
            # Played again by other players: another bass, no drums. With the library's bass program
            # and drum kit, fluidsynth renders those notes sample for sample as in the library's file:
            # shared stems, which a fingerprint rightly finds (at an equal tempo, t09, even in time).
            other_bass = _rng(seed, f"tune{i}c").choice([b for b in S.BASSES if b != bass])
            music_job(f"outside/melody_replayed/t{i:02d}c.wav", tune, pc, other_bass, bpm_a * g.uniform(0.8, 1.25),
                      acc, f"tune{i}", out, drums=False)
    for i in range(6):
        bpm = g.uniform(70, 160)
        tune = S.make_tune(_rng(seed, f"out-tune{i}"), 30 * bpm / 60)
        music_job(f"outside/unrelated/music{i}.wav", tune, g.choice(S.PROGRAMS), 33, bpm, True, f"out-tune{i}", out)

    # sox synthesis: 8 takes of each recipe in the library, 3 more outside
    for recipe in S.SYNTH_RECIPES:
        for i in range(11):
            rel = (f"library/synth/{recipe}{i}.wav" if i < 8 else f"outside/other_take/{recipe}{i}.wav")
            secs = g.uniform(8, 40)
            (lib if i < 8 else out).append(
                Job(rel, "synth", f"synth-{recipe}", lambda p, r=rel, rc=recipe, s=secs: S.synth(p, rc, _rng(seed, r), s)))
    for recipe in S.SHORT_RECIPES:
        for i in range(6):
            rel = (f"library/short/{recipe}{i}.wav" if i < 4 else f"outside/other_take/short_{recipe}{i}.wav")
            (lib if i < 4 else out).append(
                Job(rel, "short", f"short-{recipe}", lambda p, r=rel, rc=recipe: S.short(p, rc, _rng(seed, r))))

    # recordings from installed packages: three in four into the library, the rest outside
    for src in S.package_sounds():
        family = S.package_family(src)
        outside = zlib.crc32(f"{seed}:{family}".encode()) % 4 == 3
        into, top = (out, "outside/package") if outside else (lib, "library/package")
        rel = f"{top}/{src.parent.name}-{src.name}"
        into.append(Job(rel, "package", f"pkg-{family}", lambda p, s=src: S.copy_package(s, p)))

    # recorded music from installed packages: three in four tracks into the library, the rest outside
    for src in S.recorded_music():
        outside = zlib.crc32(f"{seed}:{src.name}".encode()) % 4 == 3
        rel = f"{'outside' if outside else 'library'}/recorded/{src.stem}.wav"
        (out if outside else lib).append(Job(rel, "recorded", f"rec-{src.stem}", lambda p, s=src: S.copy_recorded(s, p)))

    # backgrounds for mixing: babble (four voices at once) and music, neither in the library
    out.append(Job("outside/background/babble.wav", "background", "babble", lambda p: _babble(p, seed)))
    out.append(Job("outside/background/music.wav", "background", "music", lambda p: _bg_music(p, seed, font)))
    return lib, out


def _babble(path: Path, seed: int) -> None:
    r = _rng(seed, "babble")
    voices = []
    for k in range(4):
        v = path.with_suffix(f".{k}.wav")
        S.speech(v, " ".join(r.sample(S.OUTSIDE_SENTENCES, 8)), r.choice(S.VOICES), r)
        voices.append(v)
    run(["sox", "-m", *map(str, voices), str(path), "trim", "0", "40", "norm", "-3"])
    for v in voices:
        v.unlink()


def _bg_music(path: Path, seed: int, font: str) -> None:
    r = _rng(seed, "bg-music")
    tune = S.make_tune(r, 120 * 110 / 60)
    S.music(path, tune, 48, 33, 110, font, r, True)


def _make(root: Path, job: Job) -> None:
    path = root / job.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    job.make(path)


def duration(path: Path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


@dataclass
class Query:
    """One query and its ground truth (times in seconds)."""

    query: str
    row: str
    edit: str
    strength: str
    member: bool
    source: str | None  # library file (relative to the set), None for non-members
    lib_start: float | None = None
    lib_end: float | None = None
    query_start: float | None = None
    query_end: float | None = None
    speed: float = 1.0
    pitch: float = 1.0
    negative: str | None = None  # non-members: other_speaker, melody_replayed, other_take, unrelated, package, recorded
    related: list[str] | None = None  # library files alike on purpose (same text, melody, recipe)
    whole_file: bool = False
    origin: str | None = None  # the recording the query was cut from (for non-members, outside the library)


def _edit_job(root: Path, q: Query, src: Path, offset: float, length: float, seed: int, bg: dict) -> Query:
    """Cut the excerpt, apply the edit, fill in the query's own range."""
    rng = _rng(seed, q.query)
    out = root / q.query
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "cut.wav"
        if q.whole_file:
            run(["sox", str(src), "-b", "16", str(cut)])
        else:
            run(["sox", str(src), "-b", "16", str(cut), "trim", f"{offset:.3f}", f"{length:.3f}"])
        truth = EDITS[q.edit](cut, out, q.strength, rng, bg)
    q.speed, q.pitch = round(truth.speed, 6), round(truth.pitch, 6)
    if q.member:
        q.query_start = round(truth.query_start, 3)
        q.query_end = round(truth.query_start + length / truth.speed, 3)
    return q


def plan_queries(lib: list[Job], out: list[Job], durations: dict[str, float], seed: int,
                 per_edit: int) -> list[tuple[Query, str, float, float]]:
    """(query, source path, offset, length) for every member and non-member query."""
    g = _rng(seed, "queries")
    long = sorted(j.rel for j in lib if durations[j.rel] >= 8.5)
    whole = sorted(j.rel for j in lib if 8.0 <= durations[j.rel] <= 60.0)
    short = sorted(j.rel for j in lib if durations[j.rel] < 1.0)
    plan: list[tuple[Query, str, float, float]] = []

    def excerpt(rel: str, length: float) -> tuple[float, float]:
        d = durations[rel]
        length = min(length, d - 0.2)
        return round(g.uniform(0.1, d - length), 3), round(length, 3)

    n = 0
    for edit, strengths in ROWS:
        for strength in strengths:
            row = f"{edit} {strength}" if strength != "-" else edit
            for rel in g.sample(long, min(per_edit, len(long))):
                length = float(strength.split()[0]) if edit == "excerpt" else g.uniform(8, 12)
                off, length = excerpt(rel, length)
                q = Query(f"queries/q{n:04d}.wav", row, edit, strength, True, rel, off, round(off + length, 3),
                          origin=rel)
                plan.append((q, rel, off, length))
                n += 1
    for rows, pool, tag in ((WHOLE_ROWS, whole, "whole file"), (SHORT_ROWS, short, "short sound")):
        for edit, strength in rows:
            row = f"{tag}: {edit}" + (f" {strength}" if strength != "-" else "")
            for rel in g.sample(pool, min(per_edit, len(pool))):
                d = durations[rel]
                q = Query(f"queries/q{n:04d}.wav", row, edit, strength, True, rel, 0.0, round(d, 3), whole_file=True,
                          origin=rel)
                plan.append((q, rel, 0.0, d))
                n += 1
    groups: dict[str, list[str]] = {}
    for j in lib:
        groups.setdefault(j.group, []).append(j.rel)
    for j in out:
        if j.kind == "background":
            continue
        negative = j.rel.split("/")[1]
        edit, strength = g.choice(NONMEMBER_EDITS)
        d = durations[j.rel]
        whole_file = d < 12.5
        off, length = (0.0, d) if whole_file else excerpt(j.rel, g.uniform(8, 12))
        q = Query(f"queries/n{n:04d}.wav", f"non-member: {negative}", edit, strength, False, None,
                  negative=negative, related=sorted(groups.get(j.group, [])), whole_file=whole_file, origin=j.rel)
        plan.append((q, j.rel, off, length))
        n += 1
    return plan


def build(out_dir: Path, *, seed: int = 11, per_edit: int = 20, jobs: int = 2) -> Path:
    """Make the whole set under `out_dir` and return the manifest's path."""
    font = require_build_tools()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "manifest.json").exists():
            raise SystemExit(f"error: {out_dir} is not empty and holds no manifest.json; choose an empty folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lib, outside = plan_recordings(seed, font)
    if not any(j.kind == "recorded" for j in lib):
        print(f"note: no recorded music is installed (apt-get install {S.RECORDED_PACKAGES}): the set has none")
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda j: _make(out_dir, j), lib + outside))
    durations = {j.rel: duration(out_dir / j.rel) for j in lib + outside}
    t1 = time.perf_counter()
    bg = {name: _read_mono(out_dir / f"outside/background/{name}.wav") for name in ("music", "babble")}
    plan = plan_queries(lib, outside, durations, seed, per_edit)
    with ThreadPoolExecutor(jobs) as pool:
        queries = list(pool.map(lambda p: _edit_job(out_dir, p[0], out_dir / p[1], p[2], p[3], seed, bg), plan))
    t2 = time.perf_counter()
    manifest = {
        "seed": seed, "per_edit": per_edit,
        "library": [{"path": j.rel, "kind": j.kind, "group": j.group, "duration": round(durations[j.rel], 3)}
                    for j in lib],
        "queries": [asdict(q) for q in queries],
        "build_seconds": {"recordings": round(t1 - t0, 1), "queries": round(t2 - t1, 1)},
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    hours = sum(durations[j.rel] for j in lib) / 3600
    print(f"{len(lib)} library files ({hours:.2f} h), {len(queries)} queries "
          f"({sum(not q.member for q in queries)} non-members) in {out_dir} "
          f"[{t1 - t0:.0f} s recordings, {t2 - t1:.0f} s queries]")
    return path
