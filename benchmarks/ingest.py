"""Ingest benchmark: `audiosearch ingest` against the reference path and the bare model.

    python -m benchmarks.ingest [--device auto] [--files 96] [--batch-size B] [--precisions fp32,int8,bf16]
                                [--workers W] [--rounds 3] [--formats wav,flac,ogg,mp3]
                                [--paths reference,ingest,forward,decode,host] [--json]

A library of `--files` files (3..60 s, WAV/FLAC/OGG/MP3 or the `--formats`
given, 16..48 kHz, mono and stereo) is generated once under benchmarks/.cache,
with a full-size AST (ASTConfig defaults, 527 labels) with random weights: the
compute is the real model's. The paths are timed side by side, round-robin in
`--rounds` rounds so that a machine shared with other work slows them alike:

  reference  what a user would write: per file, soundfile decode + soxr
             resample to 16 kHz, 10.24 s segments, ASTFeatureExtractor, then
             ASTForAudioClassification in float32, one segment at a time
             (run on the first files of each round's shard, ~--ref-segments in all)
  ingest     `audiosearch.ingest.ingest` into a fresh index: everything it does
             (scan, model load, decoding, features, model, SQLite, FAISS);
             Python imports are done before the clock starts
  forward    `Model.forward_features` alone on random features, at the same
             batch size and precision as ingest
  decode     ingest's decoding alone (same worker processes, hashing,
             segmenting, shared-memory hand-over): the most segments/s the
             decoders can feed the model; below `forward`, ingest is decode-bound
  host       `ingest` with the forward pass stubbed out (instant, fixed outputs)
             and the model loaded once: the ceiling of everything around the model
  reference-process, ingest-process (only when named in --paths)
             the reference loop over every file of the shard, and the
             `audiosearch ingest` command, each in a fresh process per round:
             interpreter start, imports and model load included

ingest, forward, host and ingest-process run once per `--precisions` entry (on a
CPU by default fp32, int8, and bf16 where the CPU has it natively), so their
figures stand side by side. The report starts with the CPU's features and any
instruction-set caps in the environment (see benchmarks/backends.py).

Each path runs in its own process, so its peak RSS (and peak GPU memory) is its
own, and so is its CPU time per segment (that process's threads, plus its decoder
processes). TFLOP/s comes from the model's FLOP count (`flops_per_segment`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).parent / ".cache"
FORMATS = {"wav": {}, "flac": {}, "ogg": {}, "mp3": {"format": "MP3"}}
RATES = [16000, 22050, 32000, 44100, 48000]
MIN_LEN, MAX_LEN = 3.0, 60.0


# --------------------------------------------------------------------------- FLOPs


def flops_per_segment(config) -> float:
    """Forward FLOPs (2 per multiply-add) of ASTForAudioClassification on one 10.24 s segment.

    Patch embedding (a conv, i.e. a [patches, 16*16] x [256, D] matmul), then per layer
    the Q, K, V and output projections (4 N D^2), the MLP (2 N D I), the attention
    scores and their weighted sum (2 N^2 D), over N = patches + 2 tokens; then the head.
    Norms, softmax, GELU and residual adds are O(N D) and left out (< 0.3%).
    """
    c = config
    f = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1
    t = (c.max_length - c.patch_size) // c.time_stride + 1
    patches, d = f * t, c.hidden_size
    n = patches + 2
    embed = patches * d * c.patch_size * c.patch_size
    layer = 4 * n * d * d + 2 * n * d * c.intermediate_size + 2 * n * n * d
    head = d * c.num_labels
    return 2.0 * (embed + c.num_hidden_layers * layer + head)


# --------------------------------------------------------------------------- inputs


def checkpoint(cache: Path) -> Path:
    """The full-size random AST, saved once."""
    from audiosearch import synthetic

    path = cache / "ast-random-full"
    if not (path / "config.json").exists():
        tmp = cache / "ast-random-full.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.save_random_checkpoint(tmp)
        tmp.rename(path)
    return path


def _signal(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """A few seconds-long scenes: tone chords, filtered noise, chirps and clicks."""
    from audiosearch import synthetic as syn

    out, pos, n = np.zeros(int(seconds * rate), dtype=np.float32), 0, int(seconds * rate)
    while pos < n:
        span = min(n - pos, int(rng.uniform(2.0, 8.0) * rate))
        kind = rng.integers(4)
        secs = span / rate
        if kind == 0:
            piece = syn.chord(list(rng.uniform(100, 2000, size=3)), secs, rate)
        elif kind == 1:
            piece = syn.noise(secs, rate, seed=int(rng.integers(1 << 30)), pink=bool(rng.integers(2)))
        elif kind == 2:
            piece = syn.chirp(rng.uniform(50, 500), rng.uniform(1000, rate / 2.5), secs, rate)
        else:
            piece = syn.clicks(secs, rate, per_second=float(rng.uniform(2, 20)), amp=0.5)
        m = min(span, len(piece))
        out[pos : pos + m] = piece[:m]
        pos += span
    return out


def library(cache: Path, files: int, rounds: int, seed: int, formats: list[str]) -> list[Path]:
    """`files` files in `rounds` shard folders (file i in shard i % rounds), made once and kept.

    Files are generated in parallel, one process per core: a GPU-sized library
    (thousands of files) takes minutes on a 16-core machine instead of an hour.
    """
    kinds = "" if formats == list(FORMATS) else "-" + "-".join(formats)
    root = cache / f"library-v2-{files}-{rounds}-{seed}{kinds}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        jobs = [(root, i, rounds, seed, formats[i % len(formats)]) for i in range(files)]
        with mp.get_context("fork").Pool(os.cpu_count()) as pool:
            for _ in pool.imap_unordered(_make_file, jobs, chunksize=4):
                pass
        done.write_text("")
    return [root / f"shard{r}" for r in range(rounds)]


def _make_file(job: tuple[Path, int, int, int, str]) -> None:
    import soundfile as sf

    root, i, rounds, seed, ext = job
    rng = np.random.default_rng([seed, i])
    rate, channels = int(rng.choice(RATES)), int(rng.integers(1, 3))
    seconds = float(rng.uniform(MIN_LEN, MAX_LEN))
    x = _signal(rng, seconds, rate)
    data = x if channels == 1 else np.stack([x, np.roll(x, rate // 100)], axis=1)
    path = root / f"shard{i % rounds}" / f"{i:04d}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # in blocks: libsndfile 1.2's Vorbis encoder crashes on one long write
    with sf.SoundFile(path, "w", rate, channels, **FORMATS[ext]) as f:
        for start in range(0, len(data), 1 << 15):
            f.write(data[start : start + (1 << 15)])


# --------------------------------------------------------------------------- the three paths (in child processes)


def _ref_segments(x: np.ndarray) -> list[np.ndarray]:
    """10.24 s pieces; a trailing piece under 1 s is dropped (the count audiosearch makes)."""
    size, out = 163840, []
    for start in range(0, max(len(x), 1), size):
        piece = x[start : start + size]
        if start > 0 and len(piece) < 16000:
            break
        out.append(piece)
    return out


class Reference:
    """The straightforward Hugging Face loop, float32, one segment at a time."""

    def __init__(self, args, ckpt: Path):
        import torch
        from transformers import ASTFeatureExtractor, ASTForAudioClassification

        self.torch = torch
        self.device = torch.device(_device(args.device))
        self.extractor = ASTFeatureExtractor.from_pretrained(ckpt)
        self.net = ASTForAudioClassification.from_pretrained(ckpt).to(self.device).eval()
        self.warm = False

    def embed_file(self, path: Path) -> int:
        import soundfile as sf
        import soxr

        torch = self.torch
        x, rate = sf.read(path, dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(axis=1), rate, 16000)
        pieces = _ref_segments(x)
        for piece in pieces:
            inputs = self.extractor(piece, sampling_rate=16000, return_tensors="pt")
            with torch.inference_mode():
                out = self.net.audio_spectrogram_transformer(inputs["input_values"].to(self.device))
                logits = self.net.classifier(out.pooler_output)
                emb = torch.nn.functional.normalize(out.pooler_output, dim=-1)
                _ = emb.cpu().numpy(), torch.sigmoid(logits).cpu().numpy()
        return len(pieces)

    def round(self, shard: Path, want_segments: int) -> dict:
        files = sorted(p for p in shard.iterdir() if p.is_file())
        if not self.warm:  # first call pays one-off allocator/oneDNN set-up: not what we time
            self.embed_file(files[0])
            self.warm = True
        segments, used = 0, 0
        start = time.perf_counter()
        for path in files:
            segments += self.embed_file(path)
            used += 1
            if segments >= want_segments:
                break
        return {"segments": segments, "files": used, "seconds": time.perf_counter() - start}


class Ingest:
    """`audiosearch ingest` as the library runs it, into a fresh index each round."""

    def __init__(self, args, ckpt: Path):
        from transformers import ASTForAudioClassification  # noqa: F401  (resolve the lazy import now)

        # Python imports (~5 s, once per process) stay outside the timing, as for the other paths;
        # everything ingest() does (model load from disk included) is timed, every round.
        self.args, self.ckpt = args, ckpt
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))

    def round(self, shard: Path, _want: int) -> dict:
        from audiosearch.ingest import ingest

        index = self.tmp / shard.name
        shutil.rmtree(index, ignore_errors=True)
        start = time.perf_counter()
        s = ingest(
            [shard], index_dir=index, model=str(self.ckpt), device=self.args.device, precision=self.args.precision,
            batch_size=self.args.batch_size, workers=self.args.workers,
        )
        seconds = time.perf_counter() - start
        if s.failed or s.skipped:
            raise RuntimeError(f"ingest failed files: {s.failed + s.skipped}")
        return {"segments": s.segments, "files": s.added, "seconds": seconds}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Forward:
    """The bare network at ingest's batch size and precision, on random features."""

    def __init__(self, args, ckpt: Path):
        import torch

        from audiosearch.embedder import default_batch_size
        from audiosearch.model import Model

        self.torch = torch
        self.model = Model(str(ckpt), device=args.device, precision=args.precision, auto_int8=True)
        self.batch = args.batch_size or default_batch_size(self.model.device)
        self.batches = args.forward_batches
        c = self.model.features
        self.x = torch.randn(self.batch, c.max_length, c.num_mel_bins, device=self.model.device)
        self.run(1)  # warm-up

    def run(self, batches: int) -> None:
        """Queue `batches` forward passes, then bring their outputs back (ingest keeps one batch
        in flight too; a per-batch sync here would only slow the bare figure on a GPU)."""
        outs = [self.model.forward_features(self.x)[:2] for _ in range(batches)]
        _ = [(pooled.float().cpu(), logits.float().cpu()) for pooled, logits in outs]

    def round(self, _shard: Path, _want: int) -> dict:
        start = time.perf_counter()
        self.run(self.batches)
        return {"segments": self.batch * self.batches, "files": 0, "seconds": time.perf_counter() - start}


class Host(Ingest):
    """`ingest` with the model's forward pass replaced by an instant stub and the model loaded
    once: the ceiling of everything around the model (decoding, segmenting, staging, SQLite, FAISS)."""

    def __init__(self, args, ckpt: Path):
        import torch

        import audiosearch.ingest
        from audiosearch.model import Model, ModelOutput, PendingOutput

        super().__init__(args, ckpt)
        loaded = Model(str(ckpt), device=args.device, precision=args.precision, auto_int8=True)
        audiosearch.ingest.Model = lambda *_args, **_kwargs: loaded  # this process runs only this path
        config = json.loads((ckpt / "config.json").read_text())
        rows = 1024  # more than any batch
        embeddings = torch.nn.functional.normalize(torch.randn(rows, config["hidden_size"]), dim=-1)
        scores = torch.rand(rows, len(config["id2label"]))

        def launch(_self, waveforms, _lengths, *, tokens=False):
            n = len(waveforms)
            return PendingOutput(ModelOutput(embeddings[:n].clone(), scores[:n].clone()))

        Model.launch = launch


class Decode:
    """Ingest's decoding alone: what the decoders can feed the model, in segments/s."""

    def __init__(self, args, _ckpt: Path):
        from audiosearch.embedder import default_workers
        from audiosearch.model import resolve_device

        self.workers = default_workers(resolve_device(args.device)) if args.workers is None else args.workers

    def round(self, shard: Path, _want: int) -> dict:
        from audiosearch.audio import segment
        from audiosearch.decode_pool import DecodePool

        files = sorted(str(p) for p in shard.iterdir() if p.is_file())
        segments = 0
        start = time.perf_counter()
        for d in DecodePool(self.workers, with_hash=True).map((p, p) for p in files):
            if d.audio is None:
                raise RuntimeError(f"{d.path}: {d.error}")
            segments += len(segment(d.audio.samples))
        return {"segments": segments, "files": len(files), "seconds": time.perf_counter() - start}


class IngestProcess:
    """`audiosearch ingest` as a user starts it, a fresh process each round: interpreter start,
    imports and model load included (into a fresh index)."""

    def __init__(self, args, ckpt: Path):
        self.args, self.ckpt = args, ckpt
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-process-"))

    def command(self, shard: Path, index: Path) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "audiosearch", "ingest", str(shard), "--index", str(index), "--model",
               str(self.ckpt), "--device", a.device, "--precision", a.precision, "--json"]
        if a.batch_size:
            cmd += ["--batch-size", str(a.batch_size)]
        if a.workers is not None:
            cmd += ["--workers", str(a.workers)]
        return cmd

    def round(self, shard: Path, _want: int) -> dict:
        import subprocess

        index = self.tmp / shard.name
        shutil.rmtree(index, ignore_errors=True)
        start = time.perf_counter()
        out = subprocess.run(self.command(shard, index), check=True, capture_output=True, text=True).stdout
        seconds = time.perf_counter() - start
        summary = json.loads(out.strip().splitlines()[-1])
        return {"segments": summary["segments"], "files": summary["added"], "seconds": seconds}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ReferenceProcess(IngestProcess):
    """The reference loop over every file of the shard, in a fresh process each round
    (`--reference-only SHARD`): interpreter start, imports and model load included."""

    def command(self, shard: Path, _index: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks.ingest", "--device", self.args.device, "--cache", self.args.cache,
                "--reference-only", str(shard)]


def reference_only(args) -> None:
    """Child of ReferenceProcess: embed every file of one shard the reference way, print a summary."""
    ref = Reference(args, checkpoint(Path(args.cache)))
    files = sorted(p for p in Path(args.reference_only).iterdir() if p.is_file())
    print(json.dumps({"segments": sum(ref.embed_file(p) for p in files), "added": len(files)}))


PATHS = {"reference": Reference, "ingest": Ingest, "forward": Forward, "decode": Decode, "host": Host,
         "reference-process": ReferenceProcess, "ingest-process": IngestProcess}
PER_PRECISION = ("ingest", "forward", "host", "ingest-process")  # run once per --precisions entry


def _device(device: str) -> str:
    from audiosearch.model import resolve_device

    return str(resolve_device(device))


def _serve(name: str, args: argparse.Namespace, ckpt: Path, conn) -> None:
    """Child process: build the path once, then time one round per request."""
    try:
        base, _, precision = name.partition(":")
        if precision:
            args = argparse.Namespace(**{**vars(args), "precision": precision})
        path = PATHS[base](args, ckpt)
        conn.send(("ready", None))
        while (request := conn.recv()) is not None:
            shard, want = request
            before = _cpu_seconds()
            result = path.round(Path(shard), want)
            after = _cpu_seconds()
            result["cpu_s"], result["children_cpu_s"] = after[0] - before[0], after[1] - before[1]
            conn.send(("round", result))
        if hasattr(path, "close"):
            path.close()
        conn.send(("done", _memory(args)))
    except BaseException as e:  # report, so the parent can stop cleanly
        import traceback

        conn.send(("error", f"{name}: {e!r}\n{traceback.format_exc()}"))


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process (all threads) and of its finished children (decoders exit with each run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _memory(args) -> dict:
    import torch

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"peak_rss_mib": usage, "peak_child_rss_mib": children}
    if torch.cuda.is_available() and _device(args.device).startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# --------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import ASTConfig

    from audiosearch.embedder import default_batch_size, default_workers
    from audiosearch.model import resolve_device

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = checkpoint(cache)
    shards = library(cache, args.files, args.rounds, args.seed, args.formats)
    setup_s = time.perf_counter() - t0

    device = resolve_device(args.device)
    config = ASTConfig.from_pretrained(ckpt)
    gflop = flops_per_segment(config) / 1e9
    result = {
        "command": "python -m benchmarks.ingest " + " ".join(sys.argv[1:]),
        "machine": _machine(device),
        "device": str(device),
        "precisions": args.precisions,
        "cpu": cpu_report() if device.type == "cpu" else None,
        "batch_size": args.batch_size or default_batch_size(device),
        "workers": default_workers(device) if args.workers is None else args.workers,
        "torch_threads": torch.get_num_threads(),
        "files": args.files,
        "rounds": args.rounds,
        "gflop_per_segment": gflop,
        "setup_seconds": setup_s,
        "load_before": os.getloadavg(),
    }

    ctx = mp.get_context("spawn")
    children = {}
    names = [f"{name}:{p}" if name in PER_PRECISION else name for name in args.paths for p in
             (args.precisions if name in PER_PRECISION else [None])]
    for name in names:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(name, args, ckpt, child))  # not daemonic: ingest forks decoders
        proc.start()
        children[name] = (proc, parent)
    try:
        for name, (_, conn) in children.items():
            _expect(conn, "ready")
        rounds = {name: [] for name in names}
        want = max(1, args.ref_segments // args.rounds)
        for r, shard in enumerate(shards):
            for name, (_, conn) in children.items():
                conn.send((str(shard), want))
                rounds[name].append(_expect(conn, "round"))
                _say(args, f"round {r + 1}/{args.rounds} {name}: {_rate(rounds[name][-1]):.3f} segments/s "
                     f"(load average {os.getloadavg()[0]:.2f})")
        memory = {}
        for name, (_, conn) in children.items():
            conn.send(None)
            memory[name] = _expect(conn, "done")
    finally:
        for proc, _ in children.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    result["load_after"] = os.getloadavg()
    result["paths"] = {}
    for name in names:
        segments = sum(x["segments"] for x in rounds[name])
        seconds = sum(x["seconds"] for x in rounds[name])
        rate = segments / seconds
        per_round = [_rate(x) for x in rounds[name]]
        median = statistics.median(per_round)
        result["paths"][name] = {
            "segments": segments, "files": sum(x["files"] for x in rounds[name]), "seconds": seconds,
            "segments_per_s": rate, "rounds": per_round, "median_segments_per_s": median,
            "tflops": median * gflop / 1e3, **memory[name],
            "cpu_ms_per_segment": 1e3 * sum(x["cpu_s"] for x in rounds[name]) / segments,
            "children_cpu_ms_per_segment": 1e3 * sum(x["children_cpu_s"] for x in rounds[name]) / segments,
        }
    p = result["paths"]
    # Headline ratios use each path's median round: on a shared machine another job can slow
    # any one round of any one path; the all-rounds ratios are kept alongside.
    for one, other in ratios(args.precisions):
        if one in p and other in p:
            key = f"{one}_over_{other}"
            result[key] = p[one]["median_segments_per_s"] / p[other]["median_segments_per_s"]
            result[key + "_all_rounds"] = p[one]["segments_per_s"] / p[other]["segments_per_s"]
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def ratios(precisions: list[str]) -> list[tuple[str, str]]:
    """Per precision: ingest against the reference and against its own bare forward; decoding and
    the host side against the first precision's forward; the other precisions against the first."""
    first = precisions[0]
    out = []
    for p in precisions:
        out += [(f"ingest:{p}", "reference"), (f"ingest:{p}", f"forward:{p}"),
                (f"ingest-process:{p}", "reference-process")]
    out += [("decode", f"forward:{first}"), (f"host:{first}", f"forward:{first}")]
    out += [(f"{path}:{p}", f"{path}:{first}") for p in precisions[1:] for path in ("forward", "ingest")]
    return out


def _expect(conn, kind: str):
    got, payload = conn.recv()
    if got == "error":
        raise RuntimeError(payload)
    assert got == kind, (got, kind)
    return payload


def _rate(x: dict) -> float:
    return x["segments"] / x["seconds"]


def _say(args, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


def _machine(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


ISA_CAPS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS")


def cpu_report() -> str:
    """The CPU, its vector/matrix features, any instruction-set caps in the environment, and
    what audiosearch makes of it (native bf16 or not)."""
    import torch

    from audiosearch.model import cpu_features, cpu_has_native_bf16

    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if k in os.environ]
    return (f"CPU: {_machine(torch.device('cpu'))}; features: {' '.join(sorted(cpu_features())) or 'none found'}; "
            f"torch kernels: {torch.backends.cpu.get_cpu_capability()}; "
            f"instruction-set caps: {' '.join(caps) or 'none'}; native bf16: {'yes' if cpu_has_native_bf16() else 'no'}")


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)  # the table stays whole when piped to a file
    console.print(f"[bold]{r['command']}[/]")
    if r["cpu"]:
        console.print(r["cpu"], highlight=False)
    console.print(
        f"{r['machine']}; device {r['device']}, precisions {', '.join(r['precisions'])}, batch {r['batch_size']}, "
        f"decode workers {r['workers']}, torch threads {r['torch_threads']}; "
        f"{r['gflop_per_segment']:.1f} GFLOP/segment; load avg {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"
    )
    table = Table()
    for col in ("path", "segments", "files", "seconds", "segments/s", "per round", "median", "TFLOP/s",
                "CPU ms/segment", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "path" else "right")
    gpu = any("peak_gpu_mib" in p for p in r["paths"].values())
    if gpu:
        table.add_column("peak GPU MiB", justify="right")
    labels = {
        "reference": "(1) reference: HF, fp32, batch 1",
        "ingest": "(2) audiosearch ingest",
        "forward": "(3) bare forward",
        "decode": f"(4) decoding alone, {r['workers']} workers",
        "host": "(5) ingest, forward stubbed out",
        "reference-process": "(6) reference, whole process",
        "ingest-process": "(7) audiosearch ingest, whole process",
    }
    for name, p in r["paths"].items():
        base, _, precision = name.partition(":")
        row = [
            labels[base] + (f", {precision}" if precision else ""), str(p["segments"]), str(p["files"]), f"{p['seconds']:.1f}", f"{p['segments_per_s']:.3f}",
            " ".join(f"{x:.3f}" for x in p["rounds"]), f"{p['median_segments_per_s']:.3f}",
            "–" if base in ("decode", "host") else f"{p['tflops']:.3f}",
            f"{p['cpu_ms_per_segment']:.2f}" + (f" + {c:.2f}*" if (c := p["children_cpu_ms_per_segment"]) else ""),
            f"{p['peak_rss_mib']:.0f}" + (f" (decoders {p['peak_child_rss_mib']:.0f}*)" if base in ("ingest", "decode", "host") else ""),
        ]
        if gpu:
            row.append(f"{p.get('peak_gpu_mib', 0):.0f}")
        table.add_row(*row)
    console.print(table)
    lines = [
        f"{one} / {other} = [bold]{r[key]:.2f}x[/] (pooled {r[key + '_all_rounds']:.2f}x)"
        for one, other in ratios(r["precisions"]) if (key := f"{one}_over_{other}") in r
    ]
    if lines:
        console.print("medians: " + "\n         ".join(lines))
    console.print(
        f"TFLOP/s at the median rate; CPU: the path's process (all threads) + its decoders*. "
        f"* a decoder's RSS counts the model pages it shares with its parent. "
        f"Wall {r['wall_seconds']:.0f} s, of which setup {r['setup_seconds']:.0f} s."
    )


def default_precisions(device: str) -> list[str]:
    """On a CPU: float32, int8, and bf16 where the CPU runs it natively; on a GPU: what auto picks."""
    from audiosearch.model import cpu_has_native_bf16, resolve_device

    if resolve_device(device).type != "cpu":
        return ["auto"]
    return ["fp32", "int8"] + (["bf16"] if cpu_has_native_bf16() else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--files", type=int, default=96, help="library size (split across rounds)")
    parser.add_argument("--batch-size", type=int, default=None, help="ingest's batch size (default: ingest's own)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated, from auto,fp32,bf16,fp16,int8; ingest, forward and host run once "
                             "for each (default on a CPU: fp32,int8 and bf16 where native; on a GPU: auto)")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: ingest's own)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions of the paths")
    parser.add_argument("--ref-segments", type=int, default=30, help="segments the reference path embeds in all")
    parser.add_argument("--forward-batches", type=int, default=None, help="timed batches per round (default: ~1/3 of ingest's segments)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from " + ",".join(FORMATS))
    parser.add_argument("--paths", default="reference,ingest,forward,decode,host",
                        help="comma-separated, from " + ",".join(PATHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--reference-only", default=None, help=argparse.SUPPRESS)  # ReferenceProcess's child
    args = parser.parse_args(argv)
    if args.reference_only:
        return reference_only(args)
    args.precisions = default_precisions(args.device) if args.precisions is None else args.precisions.split(",")
    if unknown := set(args.precisions) - {"auto", "fp32", "bf16", "fp16", "int8"}:
        parser.error(f"unknown precision: {', '.join(sorted(unknown))}")
    args.formats, args.paths = args.formats.split(","), args.paths.split(",")
    for given, known in ((args.formats, FORMATS), (args.paths, PATHS)):
        if unknown := set(given) - set(known):
            parser.error(f"unknown: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    if args.forward_batches is None:
        from audiosearch.embedder import default_batch_size
        from audiosearch.model import resolve_device

        batch = args.batch_size or default_batch_size(resolve_device(args.device))
        # ~1/3 of the segments ingest sees per round (files average ~3.5 segments)
        args.forward_batches = max(2, round(args.files / args.rounds * 3.5 / 3 / batch))
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
