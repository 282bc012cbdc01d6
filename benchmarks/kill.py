"""Kill-loop: SIGKILL the whole `audiosearch ingest` at random moments, resume, compare with a clean run.

    python -m benchmarks.kill [--kills 200] [--files 24] [--workers 2] [--seed 0] [--json]

A generated library (short and long files, a few broken ones) and a tiny AST
(2 layers, 527 labels) live in a temporary folder. The library cycles through
states so that kills land in every phase: all files; one file deleted (prune);
one file renamed (move); all files again (re-embed, move back); and now and
then a fresh index (built from nothing, with IVF k-means: the index is told to
go IVF from 16 segments, 8 per list). FAISS checkpoints every 0.3 s so that kills land in
mid-run saves too.

Each round: start `ingest` on the current state and SIGKILL it, either at a
moment drawn uniformly over an unkilled run's duration, or, since most phases
last milliseconds next to the model's loading, 0-20 ms after the start of a
phase drawn from those the round goes through (scan, model loaded, decoding,
model, commit, FAISS save and sync, k-means retraining, the fingerprint
lookup's save, prune, move); then check
  - leftovers: no process of the killed run (its process group) alive 2 s later,
  - the write lock is free as soon as the killed process is reaped,
  - the resumed run (started at once) is not refused and completes,
  - the index then equals a clean run's of that state: same files and statuses,
    same fingerprints, same segment ranges, vectors bit-identical, and `doctor`
    finds nothing (it checks the FAISS file and the print lookup against SQLite).
The phases active at each kill (traced by the child) are counted.

To afford hundreds of runs, this process imports audiosearch once and forks a
child per CLI run (the child runs the CLI's `main` as `python -m audiosearch`
would, in its own process group, and exits; it is the process killed, with
its decoders). The parent never runs torch or FAISS itself, so every child
starts from clean state. The model and the clean references are built in
children too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import soundfile as sf

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
LEFTOVER_GRACE = 2.0  # seconds a killed run's workers get to disappear
STATES = ("all", "deleted", "all", "moved", "all")  # cycled; "fresh" rounds wipe the index first
FRESH_EVERY = 7


def make_library(root: Path, files: int) -> None:
    """Mono 16 kHz WAV/FLAC files of 0.05..22 s, and three broken files."""
    from audiosearch import synthetic as syn

    root.mkdir(parents=True)
    for i in range(files):
        seconds = (0.05, 2.0, 6.0, 22.0)[i % 4]  # 1, 1, 1 and 3 segments
        sound = syn.tone(180 + 37 * i, seconds) if i % 2 else syn.noise(seconds, seed=i)
        sf.write(root / f"{i:03d}.{'flac' if i % 3 == 0 else 'wav'}", sound, 16000)
    (root / "broken_empty.wav").write_bytes(b"")
    (root / "broken_noise.flac").write_bytes(np.random.default_rng(1).bytes(4000))
    (root / "broken_header.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")


def set_state(root: Path, stash: Path, state: str) -> None:
    """Put the library in `state`: a quarter of the files deleted (kept in `stash`), or another quarter moved."""
    deleted = sorted(root.glob("*1.wav")) + sorted(stash.glob("*"))
    moved = sorted(root.glob("*2.wav")) + sorted((root / "moved").glob("*"))
    for path in moved:  # back to "all"
        if path.parent.name == "moved":
            os.replace(path, root / path.name.replace("-renamed", ""))
    for path in deleted:
        if path.parent == stash:
            os.replace(path, root / path.name)
    if state == "deleted":
        stash.mkdir(exist_ok=True)
        for path in sorted(root.glob("*1.wav")):
            os.replace(path, stash / path.name)
    elif state == "moved":
        (root / "moved").mkdir(exist_ok=True)
        for path in sorted(root.glob("*2.wav")):
            os.replace(path, root / "moved" / f"{path.stem}-renamed{path.suffix}")


# ----------------------------------------------------------------------------- children


def _trace_points() -> None:
    """In a child: write "+phase" / "-phase" lines to AUDIOSEARCH_KILL_TRACE as the run enters and leaves phases."""
    import contextlib
    import functools

    import audiosearch.decode_pool as decode_pool
    import audiosearch.index as index
    import audiosearch.ingest as ingest
    import audiosearch.match.lookup as lookup
    import audiosearch.model as model
    import audiosearch.store as store

    fd = os.open(os.environ["AUDIOSEARCH_KILL_TRACE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(text: str) -> None:
        os.write(fd, text.encode() + b"\n")

    def traced(owner, name: str, phase: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            mark("+" + phase)
            try:
                return real(*args, **kwargs)
            finally:
                mark("-" + phase)

        setattr(owner, name, wrapper)

    def traced_generator(owner, name: str, phase: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            mark("+" + phase)
            try:
                yield from real(*args, **kwargs)
            finally:
                mark("-" + phase)

        setattr(owner, name, wrapper)

    real_transaction = store.Store.transaction

    @contextlib.contextmanager
    def transaction(self, **kwargs):
        mark("+commit")
        try:
            with real_transaction(self, **kwargs):
                yield
        finally:
            mark("-commit")

    store.Store.transaction = transaction
    traced(ingest, "scan", "scan")
    traced(ingest, "plan_changes", "plan")
    traced(store.Store, "delete_files", "prune")
    traced(store.Store, "move_file", "move")
    traced(model.Model, "__init__", "model-load")
    traced_generator(decode_pool.DecodePool, "map", "decoding")
    traced(model.Model, "launch", "model")
    traced(index.VectorIndex, "save", "faiss-save")
    traced(index, "_train", "retrain")
    traced(index, "sync_index", "index-sync")
    traced(lookup, "save", "prints-save")


def _configure_child() -> None:
    """Test settings: FAISS checkpoints every 0.3 s, IVF (with k-means) from 16 segments, 8 per list."""
    import audiosearch.index as index
    import audiosearch.ingest as ingest
    from audiosearch.collection import Collection
    from audiosearch.index import IndexOptions

    ingest.CHECKPOINT_SECONDS = 0.3
    index.MIN_POINTS_PER_LIST = 8
    Collection.index_options = lambda self: IndexOptions(exact_below=16, device="cpu")
    if os.environ.get("AUDIOSEARCH_KILL_TRACE"):
        _trace_points()


def fork_cli(argv: list[str], log: Path, trace: Path | None = None) -> int:
    """Run `audiosearch ARGV` in a forked child (its own process group); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setpgid(0, 0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        if trace is not None:
            os.environ["AUDIOSEARCH_KILL_TRACE"] = str(trace)
        _configure_child()
        from audiosearch.cli import app

        sys.argv = ["audiosearch", *argv]
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_call(fn, *args) -> int:
    """Run fn(*args) in a forked child and wait; its exit code (0 when fn returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _save_model(path: Path) -> None:
    from audiosearch import synthetic as syn

    syn.save_random_checkpoint(path, **TINY)


# ----------------------------------------------------------------------------- checks


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def wait_gone(pgid: int, grace: float = LEFTOVER_GRACE) -> list[int]:
    deadline = time.monotonic() + grace
    while (alive := group_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def snapshot(index: Path) -> dict:
    """path -> (status, fingerprint bytes, [(start, end, vector bytes)]) from SQLite."""
    with closing(sqlite3.connect(index / "audiosearch.db")) as db:
        prints = dict(db.execute("SELECT path, data FROM fingerprints JOIN files ON files.id = file_id"))
        files = {p: (s, prints.get(p), []) for p, s in db.execute("SELECT path, status FROM files")}
        for path, start, end, vector in db.execute(
            'SELECT path, start, "end", vector FROM segments JOIN files ON files.id = file_id ORDER BY path, start'
        ):
            files[path][2].append((start, end, vector))
    return files


def run_to_end(argv: list[str], log: Path) -> tuple[int, float]:
    started = time.monotonic()
    pid = fork_cli(argv, log)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code, time.monotonic() - started


FINISHED = (0, 3)  # ingest's exit codes for a finished run: 3 when files failed (the library holds broken files)


def doctor_clean(index: Path, log: Path) -> bool:
    code, _ = run_to_end(["doctor", "--index", str(index), "--json"], log)
    return code == 0


def _targets(before: str, state: str, fresh: bool) -> list[str | None]:
    """Where a round's kill may be aimed: anywhere (None), or the start of a phase this round goes through."""
    targets: list[str | None] = [None, None, None, "+scan", "-model-load"]
    if fresh or before != state:  # something changes, so the FAISS file is synced and saved
        targets += ["+faiss-save", "+index-sync", "+prints-save"]
    if fresh or before == "deleted":  # files to embed
        targets += ["+decoding", "+model", "+commit", "+commit"]
    if fresh:
        targets += ["+retrain", "+retrain"]
    if state == "deleted" and not fresh:
        targets += ["+prune", "+prune"]
    if "moved" in (before, state) and not fresh:
        targets += ["+move", "+move"]
    return targets


def _wait_for(trace: Path, line: str, pid: int, timeout: float) -> int | None:
    """Until the child's trace holds `line` or `timeout` passed; its wait status if it ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        try:
            if line in trace.read_text().split():
                return None
        except OSError:
            pass
        time.sleep(0.001)
    return None


def active_phases(trace: Path) -> set[str]:
    active: dict[str, int] = {}
    try:
        lines = trace.read_text().split()
    except OSError:
        return set()
    for line in lines:
        active[line[1:]] = active.get(line[1:], 0) + (1 if line[0] == "+" else -1)
    return {phase for phase, n in active.items() if n > 0}


# ----------------------------------------------------------------------------- the loop


def kill_loop(kills: int, files: int, workers: int, seed: int, work: Path) -> dict:
    from audiosearch.locks import is_locked

    rng = random.Random(seed)
    library, stash, logs = work / "library", work / "stash", work / "logs"
    logs.mkdir(parents=True)
    make_library(library, files)
    model = work / "model"
    if fork_call(_save_model, model) != 0:
        raise SystemExit("could not build the tiny model")

    def argv(index: Path) -> list[str]:
        return ["ingest", str(library), "--index", str(index), "--model", str(model), "--device", "cpu",
                "--precision", "fp32", "--batch-size", "4", "--workers", str(workers), "--json"]

    references: dict[str, dict] = {}
    durations: dict[tuple[str, bool], float] = {}
    for state in sorted(set(STATES)):
        set_state(library, stash, state)
        clean = work / f"clean-{state}"
        code, seconds = run_to_end(argv(clean), logs / f"clean-{state}.log")
        if code not in FINISHED:
            raise SystemExit(f"clean run failed: {(logs / f'clean-{state}.log').read_text()[-2000:]}")
        references[state] = snapshot(clean)
        durations[(state, True)] = seconds

    # how long each step of the cycle takes unkilled, to draw kill moments over
    index = work / "index"
    for round_ in range(1, len(STATES) + 1):
        prev, state = STATES[(round_ - 1) % len(STATES)], STATES[round_ % len(STATES)]
        set_state(library, stash, prev)
        run_to_end(argv(index), logs / "warmup.log")
        set_state(library, stash, state)
        code, seconds = run_to_end(argv(index), logs / "warmup.log")
        durations[(state, False)] = max(seconds, 0.2)
    shutil.rmtree(index)
    counts = {"kills": 0, "consistent": 0, "leftovers": 0, "lock_held_after_kill": 0, "refused": 0,
              "resume_failed": 0, "doctor_problems": 0, "not_equal": 0}
    phases: dict[str, int] = {}
    problems: list[str] = []
    round_ = -1
    while counts["kills"] < kills and round_ < 3 * kills:
        round_ += 1
        state = STATES[round_ % len(STATES)]
        fresh = round_ % FRESH_EVERY == 0
        if fresh:
            shutil.rmtree(index, ignore_errors=True)
        set_state(library, stash, state)
        trace = logs / "trace"
        trace.unlink(missing_ok=True)
        started = time.monotonic()
        expected = durations[(state, fresh or not index.exists())]
        target = rng.choice(_targets(STATES[(round_ - 1) % len(STATES)], state, fresh or not index.exists()))
        pid = fork_cli(argv(index), logs / "killed.log", trace)
        status = None
        if target is None:  # a moment drawn over the whole run
            time.sleep(rng.uniform(0.0, expected))
        else:  # a moment drawn over the first 3 ms of a phase (a whole run of the test library takes ~0.3 s)
            status = _wait_for(trace, target, pid, 2 * expected + 1)
            time.sleep(rng.uniform(0.0, 0.003))
        if status is None:
            active = active_phases(trace)
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        lock_held = is_locked(index / "write.lock")
        left = wait_gone(pid)
        killed = os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        if not killed:  # it ended before the kill landed
            active = {"finished"}
        counts["kills"] += killed
        for phase in active or {"startup"}:
            phases[phase] = phases.get(phase, 0) + 1
        counts["leftovers"] += bool(left)
        counts["lock_held_after_kill"] += lock_held
        if left:
            for p in left:
                os.kill(p, signal.SIGKILL)
            problems.append(f"round {round_}: processes {left} of the killed run were alive {LEFTOVER_GRACE} s later")

        code, _ = run_to_end(argv(index), logs / "resume.log")
        text = (logs / "resume.log").read_text()
        if "another audiosearch process" in text:
            counts["refused"] += 1
            problems.append(f"round {round_}: resume refused: {text.strip()[-300:]}")
            continue
        if code not in FINISHED:
            counts["resume_failed"] += 1
            problems.append(f"round {round_}: resume exited {code}: {text.strip()[-600:]}")
            continue
        equal = snapshot(index) == references[state]
        healthy = doctor_clean(index, logs / "doctor.log")
        counts["not_equal"] += not equal
        counts["doctor_problems"] += not healthy
        if not equal:
            problems.append(f"round {round_} ({state}): index differs from a clean run's")
        if not healthy:
            problems.append(f"round {round_}: doctor: {(logs / 'doctor.log').read_text()[-600:]}")
        counts["consistent"] += killed and equal and healthy and not left and not lock_held
    return {**counts, "rounds": round_ + 1, "phases": dict(sorted(phases.items())), "problems": problems[:20],
            "run_seconds": {f"{s}{' (fresh)' if f else ''}": round(d, 2) for (s, f), d in durations.items()}}


def _preload() -> None:
    """Import what a CLI run imports, once, before any fork (no torch or FAISS op runs here)."""
    import audiosearch.cli  # noqa: F401
    import audiosearch.doctor  # noqa: F401
    import audiosearch.ingest  # noqa: F401
    import audiosearch.render  # noqa: F401
    from transformers import ASTFeatureExtractor, ASTForAudioClassification  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, indexes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    _preload()

    work = Path(tempfile.mkdtemp(prefix="audiosearch-kill-"))
    started = time.monotonic()
    try:
        result = kill_loop(args.kills, args.files, args.workers, args.seed, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"kills {result['kills']} (of {result['rounds']} rounds; the rest ended before the kill), "
          f"consistent resumes {result['consistent']}, leftovers {result['leftovers']}, "
          f"lock held after kill {result['lock_held_after_kill']}, refused {result['refused']}, "
          f"resume failed {result['resume_failed']}, differs from clean {result['not_equal']}, "
          f"doctor problems {result['doctor_problems']}")
    print("phases active at the kill: " + ", ".join(f"{k} {v}" for k, v in result["phases"].items()))
    print(f"unkilled run seconds: {result['run_seconds']}; wall {result['wall_seconds']} s")
    for line in result["problems"]:
        print("  " + line)


if __name__ == "__main__":
    main()
