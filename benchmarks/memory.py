"""Memory of `audiosearch ingest` on long recordings: peak use against the file's length.

    python -m benchmarks.memory [--hours 1,2] [--reference CHECKOUT] [--json]

For each length, a stereo 44.1 kHz MP3 (a tune of sine tones under pink noise,
made by FFmpeg) is ingested alone with a tiny AST (2 layers: the model's own
memory is not what is measured) and one decoder, as `audiosearch ingest` runs
on a CPU. While it runs, every 50 ms, the run's memory is read from /proc:
the anonymous resident memory of the CLI and its decoders, plus the shared
memory the system holds beyond what it held before the run (decoded samples
travel between the processes in memfds, which no process's RSS shows until it
maps them). The figure is that sum's peak; the largest single process's peak
RSS is shown too.

With --reference, the same runs are made with another checkout of
audiosearch (a git worktree of an older commit, run with this environment's
packages), and each row shows both and their ratio. The machine should be
quiet: another process's shared memory would count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
POLL_SECONDS = 0.05


def make_recording(path: Path, hours: float) -> None:
    """A stereo 44.1 kHz MP3 at 128 kbit/s: tones stepping every 2 s, pink noise under them."""
    seconds = int(hours * 3600)
    tune = r"sin(2*PI*t*(220+110*mod(floor(t/2)\,7)))*0.3"  # a comma in a filter argument is escaped
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"aevalsrc={tune}|{tune}*0.8:s=44100:d={seconds}",
         "-f", "lavfi", "-i", f"anoisesrc=color=pink:a=0.05:r=44100:d={seconds}",
         "-filter_complex", "[0][1]amix=inputs=2:normalize=0", "-ac", "2", "-b:a", "128k", str(path)],
        check=True)


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _shmem_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def measure(argv: list[str], cwd: Path) -> dict:
    """Run `argv`, polling its process tree's memory; peak MiB (anonymous + new shared) and wall seconds."""
    shmem_before = _shmem_kb()
    start = time.perf_counter()
    # run from the checkout: `python -m` puts the working directory first on the path, before PYTHONPATH
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peak = largest = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        anon = [_status_kb(p, "RssAnon") for p in pids]
        peak = max(peak, sum(anon) + max(0, _shmem_kb() - shmem_before))
        largest = max(largest, max(_status_kb(p, "VmRSS") for p in pids))
        time.sleep(POLL_SECONDS)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return {"peak_mib": peak / 1024, "largest_process_mib": largest / 1024, "seconds": wall}


def run(hours: list[float], reference: Path | None, work: Path) -> list[dict]:
    model = work / "model"
    subprocess.run([sys.executable, "-c", f"from audiosearch import synthetic as s; s.save_random_checkpoint({str(model)!r}, **{TINY!r})"],
                   check=True)
    rows = []
    for h in hours:
        library = work / f"lib{h:g}h"
        library.mkdir()
        make_recording(library / "long.mp3", h)
        row: dict = {"hours": h}
        for name, checkout in (("ours", Path(__file__).resolve().parents[1]), ("reference", reference)):
            if checkout is None:
                continue
            index = work / f"index-{name}-{h:g}h"
            argv = [sys.executable, "-m", "audiosearch", "ingest", str(library), "--index", str(index),
                    "--model", str(model), "--device", "cpu", "--workers", "1", "--json"]
            row[name] = measure(argv, checkout)
            shutil.rmtree(index)
        rows.append(row)
        shutil.rmtree(library)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", default="1,2", help="recording lengths, comma-separated (default 1,2)")
    parser.add_argument("--reference", type=Path, help="another checkout of audiosearch to run beside this one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audiosearch-memory-") as tmp:
        rows = run([float(h) for h in args.hours.split(",")], args.reference, Path(tmp))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'recording':>10}  {'ours: peak':>11}  {'largest':>8}  {'wall':>6}"
          + (f"  {'reference: peak':>16}  {'largest':>8}  {'wall':>6}  {'peak ratio':>10}" if args.reference else ""))
    for row in rows:
        ours = row["ours"]
        line = f"{row['hours']:>8g} h  {ours['peak_mib']:>7.0f} MiB  {ours['largest_process_mib']:>4.0f} MiB  {ours['seconds']:>5.0f}s"
        if "reference" in row:
            ref = row["reference"]
            line += (f"  {ref['peak_mib']:>12.0f} MiB  {ref['largest_process_mib']:>4.0f} MiB  {ref['seconds']:>5.0f}s"
                     f"  {ours['peak_mib'] / ref['peak_mib']:>10.2f}")
        print(line)


if __name__ == "__main__":
    main()
