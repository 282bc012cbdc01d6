"""Feature files: the Parquet, NumPy .npz and .npy layouts that `embed` and `export` write, and their reader.

One row per segment: file path, start and end (seconds), the pooled
embedding, and the label scores (all of them, aligned with the `labels`
metadata, or the best N per row as names + scores), plus the last-layer patch
tokens when asked for. Rows stream to disk as they come, so memory stays flat
however long the run: Parquet in row groups, NumPy arrays through temporary
files next to the output. The file appears under its name only when complete.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import FeatureFileError
from .locks import FileLock, is_locked

FORMAT_VERSION = 1
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".npz": "npz", ".npy": "npy"}
HEADER_KEY = "audiosearch"  # Parquet schema metadata: the header, JSON
RUN_KEY = "audiosearch.run"  # Parquet file metadata: rows, failed, skipped (known only at the end), JSON
ROW_GROUP_BYTES = 64 << 20
STAGING_LOCK = ".audiosearch-staging.lock"  # held by the run writing a staging folder


@dataclass(frozen=True)
class FeatureHeader:
    """What every row of a file shares: where the features came from and how rows are laid out."""

    model: str
    fingerprint: str | None
    labels: list[str]
    dim: int
    params: dict[str, object]  # segmenting and feature settings, as far as the source knows them
    source: str  # "embed", or the index directory that `export` read
    top_labels: int | None = None  # keep only the N best labels per row
    token_shape: tuple[int, int, int] | None = None  # (T', F', D) when patch tokens are written
    float16: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dtype"] = "float16" if data.pop("float16") else "float32"
        return {"format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureHeader:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("token_shape") is not None:
            values["token_shape"] = tuple(values["token_shape"])
        return cls(**values, float16=data["dtype"] == "float16")


@dataclass
class FeatureRows:
    """Segment rows as computed or stored: float32 arrays, scores over all labels."""

    paths: list[str]
    starts: np.ndarray  # [n] seconds
    ends: np.ndarray  # [n] seconds
    embeddings: np.ndarray  # [n, D]
    scores: np.ndarray  # [n, labels]
    tokens: np.ndarray | None = None  # [n, T', F', D]


@dataclass
class Features:
    """A feature file loaded back; `metadata` holds the header plus `rows`, `failed` and `skipped`."""

    paths: list[str]
    starts: np.ndarray
    ends: np.ndarray
    embeddings: np.ndarray
    metadata: dict
    scores: np.ndarray | None = None  # [N, labels], when all labels were kept
    top_labels: np.ndarray | None = None  # [N, k] label names, best first, with --top-labels
    top_scores: np.ndarray | None = None  # [N, k]
    tokens: np.ndarray | None = None  # [N, T', F', D], with --tokens

    @property
    def labels(self) -> list[str]:
        return self.metadata["labels"]

    @property
    def failed(self) -> list[dict]:
        return self.metadata["failed"]

    @property
    def skipped(self) -> list[dict]:
        return self.metadata["skipped"]


def output_format(path: str | Path, *, top_labels: int | None = None, tokens: bool = False) -> str:
    """The format a path's extension asks for; refuses what that format cannot hold."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise FeatureFileError(f"cannot tell the format of {path}: name it .parquet, .npz or .npy")
    if fmt == "npy" and (tokens or top_labels):
        raise FeatureFileError(
            f"{path}: a .npy file holds only the embedding matrix; write .parquet or .npz for label scores or tokens"
        )
    return fmt


def column_specs(header: FeatureHeader) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every column but `path`: its dtype and the shape of one row."""
    floats = np.dtype(np.float16 if header.float16 else np.float32)
    seconds = (np.dtype(np.float64), ())
    specs = {"start": seconds, "end": seconds, "embedding": (floats, (header.dim,))}
    if header.top_labels:
        specs["top_labels"] = (np.asarray(header.labels).dtype, (header.top_labels,))
        specs["top_scores"] = (floats, (header.top_labels,))
    else:
        specs["scores"] = (floats, (len(header.labels),))
    if header.token_shape:
        specs["tokens"] = (floats, tuple(header.token_shape))
    return specs


class FeatureWriter:
    """Streams rows into a feature file, which appears under its name only on `commit`.

    Use as a context manager: leaving it without committing (an error, Ctrl-C)
    removes everything written so far.
    """

    def __init__(self, path: str | Path, header: FeatureHeader):
        self.path = Path(path)
        self.header = header
        fmt = output_format(self.path, top_labels=header.top_labels, tokens=header.token_shape is not None)
        if header.top_labels and not 0 < header.top_labels <= len(header.labels):
            raise FeatureFileError(f"--top-labels must be between 1 and {len(header.labels)}, the model's label count")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(self.path)
        self._staging = tempfile.TemporaryDirectory(dir=self.path.parent, prefix=f".{self.path.name}.")
        self._owner = FileLock(Path(self._staging.name) / STAGING_LOCK)  # freed by the kernel if this run is killed
        self._owner.acquire()
        self._sink = _SINKS[fmt](Path(self._staging.name), header)
        self._specs = column_specs(header)
        self._label_names = np.asarray(header.labels)
        self.rows = 0

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._owner.release()
        self._staging.cleanup()

    def write(self, rows: FeatureRows) -> None:
        self._sink.add(list(rows.paths), self._columns(rows))
        self.rows += len(rows.paths)

    def commit(self, failed: list[tuple[str, str]], skipped: list[tuple[str, str]]) -> int:
        """Finish the file with the run's outcome, move it into place, and return the bytes written."""
        run = {
            "rows": self.rows,
            "failed": [{"path": p, "error": e} for p, e in failed],
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        }
        written = 0
        for staged, final in self._sink.finish(run, self.path):
            written += staged.stat().st_size
            os.replace(staged, final)
        return written

    def _columns(self, rows: FeatureRows) -> dict[str, np.ndarray]:
        columns = {"start": rows.starts, "end": rows.ends, "embedding": rows.embeddings, "tokens": rows.tokens}
        if self.header.top_labels:
            best = np.argsort(-rows.scores, axis=1, kind="stable")[:, : self.header.top_labels]
            columns["top_labels"] = self._label_names[best]
            columns["top_scores"] = np.take_along_axis(rows.scores, best, axis=1)
        else:
            columns["scores"] = rows.scores
        return {name: np.asarray(columns[name], dtype=dtype) for name, (dtype, _) in self._specs.items()}


def _remove_abandoned_staging(path: Path) -> None:
    """Staging folders of earlier runs for this output that were killed (SIGKILL, power loss) before cleaning up.

    A live run holds the lock inside its folder; a dead one's lock is free. Folders without the lock file
    are not ours and are left alone.
    """
    for folder in path.parent.glob(f".{glob.escape(path.name)}.*"):
        lock = folder / STAGING_LOCK
        if folder.is_dir() and lock.exists() and not is_locked(lock):
            shutil.rmtree(folder, ignore_errors=True)


def read_features(path: str | Path) -> Features:
    """Load a feature file written by `embed` or `export` (.parquet, .npz, or .npy with its .json sidecar)."""
    path = Path(path)
    fmt = output_format(path)
    if not path.exists():
        raise FeatureFileError(f"no such feature file: {path}")
    try:
        return _READERS[fmt](path)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, pa.ArrowException) as e:
        raise FeatureFileError(f"{path} is not an audiosearch feature file ({type(e).__name__}: {e})") from e


# -- formats ---------------------------------------------------------------


class _Sink(Protocol):
    def add(self, paths: list[str], columns: dict[str, np.ndarray]) -> None: ...

    def finish(self, run: dict, final: Path) -> list[tuple[Path, Path]]:
        """Complete the staged files; (staged, final) pairs to move into place."""


class _Spill:
    """One array's rows streamed to a temporary file, then written out as .npy (header + the same bytes)."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.file = open(path, "w+b")
        self.dtype, self.row_shape, self.rows = dtype, row_shape, 0

    def append(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.rows += len(array)

    def copy_npy(self, out: BinaryIO) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(out, header)
        self.file.seek(0)
        shutil.copyfileobj(self.file, out, 1 << 20)
        self.file.close()


class _ParquetSink:
    """Row groups of about ROW_GROUP_BYTES; fixed-size list columns; the header in the schema metadata."""

    def __init__(self, folder: Path, header: FeatureHeader):
        self.staged = folder / "features.parquet"
        fields_ = [pa.field("path", pa.string())]
        for name, (dtype, shape) in column_specs(header).items():
            arrow = pa.from_numpy_dtype(dtype)
            fields_.append(pa.field(name, pa.list_(arrow, int(np.prod(shape))) if shape else arrow))
        self.schema = pa.schema(fields_, metadata={HEADER_KEY: json.dumps(header.to_dict())})
        self.writer = pq.ParquetWriter(self.staged, self.schema)
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0

    def add(self, paths: list[str], columns: dict[str, np.ndarray]) -> None:
        arrays = [pa.array(paths, pa.string())] + [_arrow(columns[name]) for name in self.schema.names[1:]]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        if self.pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def finish(self, run: dict, final: Path) -> list[tuple[Path, Path]]:
        self._flush()
        self.writer.add_key_value_metadata({RUN_KEY: json.dumps(run)})
        self.writer.close()
        return [(self.staged, final)]

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
            self.pending, self.pending_bytes = [], 0


def _arrow(array: np.ndarray) -> pa.Array:
    if array.ndim == 1:
        return pa.array(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), int(np.prod(array.shape[1:])))


class _NpzSink:
    """An uncompressed .npz, as `np.savez` writes: one .npy member per column, plus label_names and metadata."""

    def __init__(self, folder: Path, header: FeatureHeader):
        self.folder, self.header = folder, header
        self.paths: list[str] = []
        specs = column_specs(header)
        self.spills = {name: _Spill(folder / name, dtype, shape) for name, (dtype, shape) in specs.items()}

    def add(self, paths: list[str], columns: dict[str, np.ndarray]) -> None:
        self.paths.extend(paths)
        for name, spill in self.spills.items():
            spill.append(columns[name])

    def finish(self, run: dict, final: Path) -> list[tuple[Path, Path]]:
        staged = self.folder / "features.npz"
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _put(zf, "path", np.array(self.paths, dtype=str))
            for name, spill in self.spills.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                    spill.copy_npy(out)
            _put(zf, "label_names", np.array(self.header.labels, dtype=str))
            _put(zf, "metadata", np.array(json.dumps({**self.header.to_dict(), **run})))
        return [(staged, final)]


def _put(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, array, allow_pickle=False)


class _NpySink:
    """The [N, D] embedding matrix as .npy; paths, times and metadata in a .json sidecar of the same name."""

    def __init__(self, folder: Path, header: FeatureHeader):
        self.folder, self.header = folder, header
        dtype, shape = column_specs(header)["embedding"]
        self.spill = _Spill(folder / "embedding", dtype, shape)
        self.rows: dict[str, list] = {"path": [], "start": [], "end": []}

    def add(self, paths: list[str], columns: dict[str, np.ndarray]) -> None:
        self.spill.append(columns["embedding"])
        self.rows["path"].extend(paths)
        self.rows["start"].extend(columns["start"].tolist())
        self.rows["end"].extend(columns["end"].tolist())

    def finish(self, run: dict, final: Path) -> list[tuple[Path, Path]]:
        matrix, sidecar = self.folder / "features.npy", self.folder / "features.json"
        with open(matrix, "wb") as out:
            self.spill.copy_npy(out)
        sidecar.write_text(json.dumps({**self.header.to_dict(), **run, **self.rows}, ensure_ascii=False))
        return [(matrix, final), (sidecar, sidecar_path(final))]


def sidecar_path(npy: Path) -> Path:
    """Where the metadata of an .npy feature file lives: the same name with .json."""
    return npy.with_suffix(".json")


_SINKS: dict[str, type[_Sink]] = {"parquet": _ParquetSink, "npz": _NpzSink, "npy": _NpySink}


def _read_parquet(path: Path) -> Features:
    pf = pq.ParquetFile(path)
    header, run = pf.schema_arrow.metadata or {}, pf.metadata.metadata or {}
    metadata = {**json.loads(header[HEADER_KEY.encode()]), **json.loads(run[RUN_KEY.encode()])}
    table = pf.read()
    columns = {"path": table.column("path").to_pylist()}
    for name, (dtype, shape) in column_specs(FeatureHeader.from_dict(metadata)).items():
        chunked = table.column(name).combine_chunks()
        values = chunked.flatten() if shape else chunked
        columns[name] = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(table), *shape)
    return _features(columns, metadata)


def _read_npz(path: Path) -> Features:
    with np.load(path, allow_pickle=False) as npz:
        metadata = json.loads(str(npz["metadata"]))
        names = ["path", *column_specs(FeatureHeader.from_dict(metadata))]
        columns = {name: npz[name] for name in names}
    columns["path"] = columns["path"].tolist()
    return _features(columns, metadata)


def _read_npy(path: Path) -> Features:
    metadata = json.loads(sidecar_path(path).read_text())
    rows = {name: metadata.pop(name) for name in ("path", "start", "end")}
    columns = {"path": rows["path"], "start": np.array(rows["start"], dtype=np.float64),
               "end": np.array(rows["end"], dtype=np.float64), "embedding": np.load(path, allow_pickle=False)}
    return _features(columns, metadata)


def _features(columns: dict, metadata: dict) -> Features:
    return Features(
        paths=columns["path"], starts=columns["start"], ends=columns["end"], embeddings=columns["embedding"],
        metadata=metadata, scores=columns.get("scores"), top_labels=columns.get("top_labels"),
        top_scores=columns.get("top_scores"), tokens=columns.get("tokens"),
    )


_READERS = {"parquet": _read_parquet, "npz": _read_npz, "npy": _read_npy}
