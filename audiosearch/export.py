"""`audiosearch embed` and `export`: AST features into a Parquet or NumPy file, for research use.

`embed_to_file` computes features for files and folders without building an
index, through the same Embedder pipeline as ingest. `export_index` writes
what an index already holds and recomputes nothing: vectors are the stored
float32 bits, scores the stored float16 values.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, SEGMENT_SECONDS
from .collection import Collection
from .embedder import Embedder, FileEmbedding, Tally
from .errors import FeatureFileError
from .embedding_files import FeatureHeader, FeatureRows, FeatureWriter, output_format
from .ingest import Progress, Unreadable, scan
from .model_ref import DEFAULT_MODEL

if TYPE_CHECKING:
    from .model import Model
from .interrupts import Interrupted, signal_of

INDEX_PARAMS = ("sample_rate", "segment_seconds", "hop_seconds", "num_mel_bins", "max_length", "mean", "std")


@dataclass
class ExportSummary(Tally):
    """What an `embed` or `export` run wrote, and which files it could not use."""

    output: str = ""
    files: int = 0
    bytes_written: int = 0
    wall_seconds: float = 0.0
    ignored: int = 0


def embed_to_file(
    paths: Iterable[str | Path],
    output: str | Path,
    *,
    model: str | Model | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    hop_seconds: float | None = None,
    top_labels: int | None = None,
    tokens: bool = False,
    float16: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """Embed the audio under `paths` (searched as ingest does) into a feature file; bad files are listed, not fatal."""
    started = time.perf_counter()
    output_format(output, top_labels=top_labels, tokens=tokens)
    unreadable: list[Unreadable] = []
    disk, ignored = scan([Path(os.path.abspath(p)) for p in paths], unreadable)
    hop = hop_seconds or SEGMENT_SECONDS
    embedder = Embedder(model or DEFAULT_MODEL, device=device, precision=precision, batch_size=batch_size,
                        workers=workers, hop_seconds=hop, tokens=tokens)
    summary = ExportSummary(output=str(output), ignored=len(ignored))
    summary.failed.extend((u.path, u.reason) for u in unreadable)  # unlistable folders, names SQLite can't hold
    if progress:
        progress.start(len(disk))
    try:
        with FeatureWriter(output, _model_header(embedder.model, hop, top_labels, tokens, float16)) as writer:
            with closing(embedder.embed_files(f.path for f in disk)) as results:
                for result in results:
                    summary.files += summary.count(result)
                    if result.segments:
                        writer.write(_computed_rows(result))
                    if progress:
                        progress.update(result)
            summary.bytes_written = writer.commit(summary.failed, summary.skipped)
    except KeyboardInterrupt as e:  # the staging folder is gone with the writer: no partial output
        raise Interrupted(signal_of(e), message=f"nothing was written to {output}; embed starts over when run "
                          "again") from None
    summary.wall_seconds = time.perf_counter() - started
    return summary


def export_index(
    index_dir: str | Path, output: str | Path, *, top_labels: int | None = None, float16: bool = False
) -> ExportSummary:
    """Write every segment an index holds to a feature file, as stored (one consistent snapshot)."""
    started = time.perf_counter()
    output_format(output, top_labels=top_labels)
    collection = Collection(index_dir)
    try:
        store = collection.store
        with store.snapshot():
            header = _index_header(collection, top_labels, float16)
            stats = store.stats()
            summary = ExportSummary(output=str(output), files=stats["files"].get("ok", 0), audio_seconds=stats["hours"] * 3600)
            summary.failed = [(r.path, r.error or "unknown error") for r in store.files("failed")]
            summary.skipped = [(r.path, r.error or "") for r in store.files("skipped")]
            with FeatureWriter(output, header) as writer:
                for batch in store.iter_segments():
                    writer.write(_stored_rows(batch, header.dim, len(header.labels)))
                    summary.segments += len(batch)
                summary.bytes_written = writer.commit(summary.failed, summary.skipped)
    finally:
        collection.close()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _model_header(model: Model, hop: float, top_labels: int | None, tokens: bool, float16: bool) -> FeatureHeader:
    f = model.features
    params = {
        "sample_rate": SAMPLE_RATE, "segment_seconds": SEGMENT_SECONDS, "hop_seconds": hop,
        "num_mel_bins": f.num_mel_bins, "max_length": f.max_length, "mean": f.mean, "std": f.std,
        "do_normalize": f.do_normalize, "precision": model.precision,
    }
    return FeatureHeader(
        model=model.name, fingerprint=model.fingerprint, labels=model.labels, dim=model.dim, params=params,
        source="embed", top_labels=top_labels, token_shape=(*model.patch_grid(), model.dim) if tokens else None,
        float16=float16,
    )


def _index_header(collection: Collection, top_labels: int | None, float16: bool) -> FeatureHeader:
    meta = collection.meta
    if "dim" not in meta:
        raise FeatureFileError(f"index {collection.dir} holds no embeddings yet; run 'audiosearch ingest' first")
    names = collection.store.label_names()
    return FeatureHeader(
        model=meta["model"], fingerprint=meta.get("fingerprint"), labels=[names[i] for i in range(len(names))],
        dim=int(meta["dim"]), params={k: json.loads(meta[k]) for k in INDEX_PARAMS if k in meta},
        source=str(collection.dir.resolve()), top_labels=top_labels, float16=float16,
    )


def _computed_rows(result: FileEmbedding) -> FeatureRows:
    segments = result.segments
    tokens = [s.tokens for s in segments]
    return FeatureRows(
        paths=[result.path] * len(segments),
        starts=np.array([s.start for s in segments], dtype=np.float64),
        ends=np.array([s.end for s in segments], dtype=np.float64),
        embeddings=np.stack([s.embedding for s in segments]),
        scores=np.stack([s.scores for s in segments]),
        tokens=None if tokens[0] is None else np.stack(tokens),
    )


def _stored_rows(batch: list[tuple], dim: int, labels: int) -> FeatureRows:
    """Rows from Store.iter_segments: (id, path, start, end, float32 vector blob, float16 scores blob)."""
    _, paths, starts, ends, vectors, scores = zip(*batch)
    n = len(batch)
    return FeatureRows(
        paths=list(paths),
        starts=np.array(starts, dtype=np.float64),
        ends=np.array(ends, dtype=np.float64),
        embeddings=np.frombuffer(b"".join(vectors), dtype="<f4").reshape(n, dim).astype(np.float32),
        scores=np.frombuffer(b"".join(scores), dtype="<f2").reshape(n, labels).astype(np.float32),
    )


