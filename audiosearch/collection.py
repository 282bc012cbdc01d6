"""An index directory: the SQLite store, the FAISS file derived from it, and the model that built them.

Readers and the single writer meet here. The writer (ingest, doctor --repair)
holds an exclusive lock and saves the FAISS file atomically, its header
tagged with the store generation it reflects. A reader trusts the file only
when that generation is current; otherwise it brings a copy up to date from
one consistent SQLite snapshot in memory, so a query always sees the last
committed state, even mid-ingest or after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .audio import SAMPLE_RATE, SEGMENT_SECONDS
from .errors import IndexLocked, IndexWriteError, ModelMismatch
from .heap import keep_freed_memory
from .index import IndexCorrupt, IndexOptions, SyncReport, VectorIndex, sync_index
from .locks import FileLock
from .match import lookup as print_lookup
from .match.lookup import LookupCorrupt, PrintLookup
from .store import Store

if TYPE_CHECKING:
    from .model import Model

INDEX_FILE = "vectors.faiss"
LOCK_FILE = "write.lock"
SCHEMA_VERSION = 1


class Collection:
    """One index directory. Open one per thread."""

    def __init__(self, index_dir: str | Path, *, create: bool = False, device: str = "auto",
                 durable: bool | None = None):
        self.dir = Path(index_dir)
        self.device = "cpu" if device == "cpu" else "auto"  # --device cpu keeps FAISS's k-means off the GPU too
        self.store = Store(self.dir, create=create, durable=durable)
        self.index_path = self.dir / INDEX_FILE
        self._lock = FileLock(self.dir / LOCK_FILE)  # never kept by a forked child (see locks.py)

    def close(self) -> None:
        self.store.close()

    @property
    def meta(self) -> dict[str, str]:
        return self.store.get_meta()

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model")

    # -- the model an index is bound to ---------------------------------
    def bind_model(self, model: Model, *, hop_seconds: float) -> None:
        """Record the model on first use; refuse a different one afterwards."""
        meta = self.meta
        if "fingerprint" not in meta:
            f = model.features
            with self.store.transaction():  # all or nothing: a half-bound index would pass check_model
                self.store.ensure_labels(model.id2label)
                self.store.set_meta(
                    {
                        "schema_version": SCHEMA_VERSION, "model": model.name, "fingerprint": model.fingerprint,
                        "dim": model.dim, "sample_rate": SAMPLE_RATE, "segment_seconds": SEGMENT_SECONDS,
                        "hop_seconds": hop_seconds, "num_mel_bins": f.num_mel_bins, "max_length": f.max_length,
                        "mean": f.mean, "std": f.std,
                    }
                )
            return
        self.check_model(model)

    def record_precision(self, precision: str) -> None:
        """Remember each precision that embedded files into this index, for `info`. Vectors of
        one model at different precisions search together (cosine >= 0.99 between them)."""
        used = set(filter(None, self.meta.get("precision", "").split("+")))
        if precision not in used:
            self.store.set_meta({"precision": "+".join(sorted(used | {precision}))})

    def check_model(self, model: Model) -> None:
        meta = self.meta
        stored = meta.get("fingerprint")
        # indexes bound before all weights were hashed can only be checked on the two tensors they hashed
        if stored is None or stored.startswith("w1:"):
            current = model.fingerprint
        else:
            from .model import legacy_fingerprint

            current = legacy_fingerprint(model)
        if stored not in (None, current):
            raise ModelMismatch(
                f"index {self.dir} was built with model {meta.get('model')!r}, not {model.name!r}; "
                "use that model (omit --model) or another --index"
            )

    # -- the FAISS file ---------------------------------------------------
    def load_index(self) -> tuple[VectorIndex, SyncReport | None]:
        """The index as of the last commit; repaired from SQLite (in memory) when stale or damaged."""
        index = self._read_index()
        with self.store.snapshot():
            if index is not None and index.generation == self.store.generation:
                return index, None
            index, report = self._sync(index)
        self._save_if_free(self._save, index)
        return index, report

    def _save_if_free(self, save, derived) -> None:
        """A reader saves its repair of a derived file (`save(derived)`) when no one is writing;
        one that may not write here keeps it in memory."""
        held = self._lock.held
        try:
            if not (held or self._try_lock()):
                return
        except OSError:
            return
        try:
            save(derived)
        except IndexWriteError:
            pass
        finally:
            if not held:
                self.unlock()

    def refresh_index(self, index: VectorIndex | None = None) -> tuple[VectorIndex, SyncReport]:
        """Writer only: bring the FAISS file up to date with SQLite and save it atomically (if it was not)."""
        with self.store.snapshot():
            index = index if index is not None else self._read_index()
            if (index is not None and index.generation == self.store.generation
                    and index.needs_rebuild(self.store.count(), self.index_options()) is None):
                return index, SyncReport(added=0, removed=0, rebuilt=False, reason=None)
            index, report = self._sync(index)
        self._save(index)
        return index, report

    def rebuild_index(self) -> VectorIndex:
        """Writer only: build the FAISS file afresh from SQLite, trusting nothing in the old one."""
        with self.store.snapshot():
            index, _ = self._sync(None)
        self._save(index)
        return index

    def _sync(self, index: VectorIndex | None) -> tuple[VectorIndex, SyncReport]:
        """Call inside a snapshot: `index` brought up to the snapshot's state and tagged with its generation."""
        index, report = sync_index(index, self.store, self.index_options())
        index.generation = self.store.generation
        return index, report

    def index_options(self) -> IndexOptions:
        """The index's memory budget: set by `ingest --memory-budget`, else AUDIOSEARCH_MEMORY_BUDGET (bytes)."""
        budget = self.meta.get("memory_budget_bytes") or os.environ.get("AUDIOSEARCH_MEMORY_BUDGET")
        if budget:
            return IndexOptions(memory_budget_bytes=int(budget), device=self.device)
        return IndexOptions(device=self.device)

    def set_memory_budget(self, gib: float) -> None:
        """Remember the budget above which vectors are stored compressed; the next refresh applies it."""
        self.store.set_meta({"memory_budget_bytes": str(int(gib * (1 << 30)))})

    def _read_index(self) -> VectorIndex | None:
        if not self.index_path.exists():
            return None
        try:
            return VectorIndex.load(self.index_path)
        except IndexCorrupt:
            return None

    def _save(self, index: VectorIndex) -> None:
        """Lock holder only: no one else is saving, so temp files left here are from a killed save."""
        try:
            for stale in self.stale_temp_files():
                stale.unlink(missing_ok=True)
            index.save(self.index_path)
        except OSError as e:
            raise IndexWriteError(f"cannot save {self.index_path} ({e.strerror or e}); searches still work, "
                                  "from SQLite, and the next ingest saves it") from e

    def stale_temp_files(self) -> list[Path]:
        """Temp files of index saves (VectorIndex.save names them so); stale unless a save is running."""
        return sorted(self.dir.glob(f".{INDEX_FILE}.*.tmp"))

    # -- the print lookup index (derived from the fingerprints, like the FAISS file) ----------
    def load_prints(self) -> PrintLookup:
        """The print lookup as of the last commit; brought up to date from SQLite (in memory) when stale.

        Whoever loads it matches with it: a lookup's temporaries are large and of the same sizes
        each time, so the heap keeps them (see heap.py).
        """
        keep_freed_memory()
        lookup = self._read_prints()
        with self.store.snapshot():
            generation = self.store.generation
            if lookup is not None and lookup.generation == generation:
                return lookup
            lookup = lookup or PrintLookup()
            lookup.sync(self.store)
            lookup.generation = generation
        self._save_if_free(self._save_prints, lookup)
        return lookup

    def refresh_prints(self) -> print_lookup.SyncReport:
        """Writer only: bring the print lookup files up to date with SQLite and save them atomically."""
        with self.store.snapshot():
            generation = self.store.generation
            lookup = self._read_prints()
            if lookup is not None and lookup.generation == generation:
                return print_lookup.SyncReport(added=0, removed=0, merged=False)
            lookup = lookup or PrintLookup()
            report = lookup.sync(self.store)
            lookup.generation = generation
        self._save_prints(lookup)
        return report

    def rebuild_prints(self) -> PrintLookup:
        """Writer only: build the print lookup afresh from SQLite, trusting nothing saved."""
        with self.store.snapshot():
            lookup = PrintLookup()
            lookup.sync(self.store)
            lookup.generation = self.store.generation
        self._save_prints(lookup)
        return lookup

    def _read_prints(self) -> PrintLookup | None:
        try:
            return print_lookup.load(self.dir)
        except LookupCorrupt:
            return None

    def _save_prints(self, lookup: PrintLookup) -> None:
        try:
            print_lookup.save(lookup, self.dir)
        except OSError as e:
            raise IndexWriteError(f"cannot save the print lookup in {self.dir} ({e.strerror or e}); duplicates "
                                  "are still found, from SQLite, and the next ingest saves it") from e


    # -- the single-writer lock -------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock, or fail at once with a clear message."""
        if not self._try_lock():
            holder = self._lock_holder()
            pid = f" (pid {holder})" if holder else ""
            raise IndexLocked(f"another audiosearch process{pid} is writing to {self.dir}; wait for it to finish")
        try:
            yield
        finally:
            self.unlock()

    def _try_lock(self) -> bool:
        return self._lock.acquire()

    def _lock_holder(self) -> int | None:
        try:
            return int((self.dir / LOCK_FILE).read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def unlock(self) -> None:
        self._lock.release()


def collection_info(index_dir: str | Path, *, errors: bool = False) -> dict:
    """What an index holds, for `audiosearch info` (read-only)."""
    collection = Collection(index_dir)
    try:
        meta, store = collection.meta, collection.store
        stats = store.stats()
        index = collection._read_index()
        info = {
            "index": str(collection.dir.resolve()),
            "model": meta.get("model"),
            "precision": meta.get("precision"),
            "files": stats["files"],
            "segments": stats["segments"],
            "hours": round(stats["hours"], 4),
            "hop_seconds": float(meta.get("hop_seconds", SEGMENT_SECONDS)),
            "vector_index": index.describe() if index else None,
            "index_current": index is not None and index.generation == store.generation,
            "fingerprints": _prints_info(collection),
            "size_bytes": sum(p.stat().st_size for p in collection.dir.iterdir() if p.is_file()),
        }
        if errors:
            info["errors"] = [
                {"path": r.path, "status": r.status, "error": r.error} for r in store.files() if r.status != "ok"
            ]
        return info
    finally:
        collection.close()


def _prints_info(collection: Collection) -> dict:
    total, printed = collection.store.file_print_counts() if collection.store.has_prints else (0, 0)
    lookup = collection._read_prints()
    return {"files": printed, "of": total, "lookup": lookup.describe() if lookup else None,
            "lookup_current": lookup is not None and lookup.generation == collection.store.generation}


def label_counts(index_dir: str | Path, *, all_labels: bool = False) -> list[tuple[str, int]]:
    """Predicted labels with the number of segments carrying each, most common first.

    `all_labels` lists the model's whole vocabulary (recorded by the first ingest), counts of 0 included.
    """
    collection = Collection(index_dir)
    try:
        return collection.store.label_counts(all_labels=all_labels)
    finally:
        collection.close()


def remove_files(index_dir: str | Path, paths: list[str | Path]) -> tuple[list[str], list[str]]:
    """Forget indexed files (a folder means every indexed file under it); nothing on disk is touched.

    Returns (paths removed, arguments that matched nothing in the index). The FAISS file follows at once.
    """
    collection = Collection(index_dir)
    try:
        with collection.writing():
            known = [row.path for row in collection.store.files()]
            removed: list[str] = []
            unknown: list[str] = []
            for arg in paths:
                matched = _indexed_under(arg, known)
                (removed.extend if matched else unknown.append)(matched or str(arg))
            removed = sorted(set(removed))
            if removed:
                with collection.store.transaction():
                    collection.store.delete_files(removed)
                collection.refresh_index()
            return removed, unknown
    finally:
        collection.close()


def _indexed_under(arg: str | Path, known: list[str]) -> list[str]:
    """Indexed paths equal to `arg` or under it, as typed (absolute) or with links resolved."""
    candidates = {os.path.abspath(arg), os.path.realpath(arg)}
    prefixes = tuple(c.rstrip(os.sep) + os.sep for c in candidates)
    return [p for p in known if p in candidates or p.startswith(prefixes)]
