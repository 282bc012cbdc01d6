"""`audiosearch doctor`: check that an index agrees with itself and with the disk, and repair what can be.

SQLite is the truth and the FAISS file is derived from it, so every repair
comes down to deleting rows that can never be right (segments of no file,
label rows of no segment, segments of failed files), recounting labels, and
rebuilding the FAISS file from SQLite, all under the write lock. What doctor
cannot fix, it says how to fix: files changed on disk need `ingest`, a
damaged database needs a backup or `sqlite3 .recover`.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .collection import Collection
from .index import IndexCorrupt, VectorIndex
from .match import lookup as print_lookup
from .match.lookup import LookupCorrupt, LookupOutdated
from .ingest import same_content
from .store import DB_NAME, Store

EXAMPLES = 5  # paths or ids shown per finding
VECTOR_BATCH = 4096
SQLITE_FINDINGS = ("orphan-prints", "orphan-segments", "unsearchable-segments", "malformed-segments", "orphan-label-rows",
                   "label-counts", "empty-files")
INDEX_FINDINGS = ("index-file", "index-missing", "index-extra", "index-vectors", "index-generation")
PRINT_FINDINGS = ("prints-file", "prints-missing", "prints-extra")


@dataclass
class Finding:
    """One thing found wrong or, when `problem` is False, worth knowing."""

    check: str  # stable name, for scripts
    message: str
    count: int = 1
    examples: list[str] = field(default_factory=list)
    problem: bool = True  # False: a note, which leaves the index healthy
    repairable: bool = True  # `--repair` fixes it


@dataclass
class DoctorReport:
    index: str
    files: int
    segments: int
    findings: list[Finding]  # before any repair
    repairs: list[str] = field(default_factory=list)  # what --repair did
    remaining: list[Finding] | None = None  # after --repair; None when not asked to repair

    @property
    def ok(self) -> bool:
        """No problem left (after the repair, when there was one)."""
        final = self.findings if self.remaining is None else self.remaining
        return not any(f.problem for f in final)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def doctor(index_dir: str | Path, *, repair: bool = False) -> DoctorReport:
    """Check the index at `index_dir`; with `repair`, fix what can be fixed under the write lock and check again."""
    shown = str(Path(index_dir).resolve())
    try:
        collection = Collection(index_dir)
    except sqlite3.DatabaseError as e:
        return DoctorReport(shown, 0, 0, [_unreadable(e)])
    try:
        if not repair:
            return _report(shown, collection)
        with collection.writing():
            report = _report(shown, collection)
            report.repairs = _repair(collection, report.findings)
            after = _report(shown, collection)
            report.remaining, report.files, report.segments = after.findings, after.files, after.segments
            return report
    finally:
        collection.close()


def _report(shown: str, collection: Collection) -> DoctorReport:
    store = collection.store
    try:
        with store.snapshot():
            findings = _check(collection)
            files, segments = len(store.files()), store.count()
    except sqlite3.DatabaseError as e:
        return DoctorReport(shown, 0, 0, [_unreadable(e)])
    return DoctorReport(shown, files, segments, findings + _temp_files(collection))


def _check(collection: Collection) -> list[Finding]:
    """Every check, against one SQLite snapshot (call inside `store.snapshot()`)."""
    store = collection.store
    damage = store.integrity_errors()
    if damage:
        message = f"SQLite integrity check failed: {damage[0]}; restore a backup or run 'sqlite3 {DB_NAME} .recover'"
        return [Finding("integrity", message, len(damage), damage[:EXAMPLES], repairable=False)]
    findings = _sqlite_findings(store)
    malformed = any(f.check == "malformed-segments" for f in findings)
    return (findings + _index_findings(collection, compare_vectors=not malformed) + _print_findings(collection)
            + _disk_findings(store))


def _unreadable(e: sqlite3.DatabaseError) -> Finding:
    return Finding("integrity", f"the database cannot be read ({e}); restore a backup or run "
                   f"'sqlite3 {DB_NAME} .recover' in the index folder", repairable=False)


def _sqlite_findings(store: Store) -> list[Finding]:
    found = (
        _ids_finding("orphan-segments", store.orphan_segments(), "segments belong to no file")
        + _ids_finding("unsearchable-segments", store.unsearchable_segments(),
                       "segments belong to files recorded as failed or skipped")
        + _ids_finding("malformed-segments", store.malformed_segments(),
                       f"segments hold a vector that is not {store.dim} float32 values "
                       "(repair forgets their files, so the next ingest embeds them again)")
    )
    if n := store.orphan_label_rows():
        found.append(Finding("orphan-label-rows", f"{n} label rows point at no segment or no label", n))
    if wrong := store.miscounted_labels():
        examples = [f"{name}: {stored} stored, {actual} actual" for name, stored, actual in wrong[:EXAMPLES]]
        found.append(Finding("label-counts", f"{len(wrong)} labels have a segment count that is wrong", len(wrong),
                             examples))
    if empty := store.empty_files():
        found.append(Finding("empty-files", f"{len(empty)} files are recorded as embedded but have no segments "
                             "(repair forgets them, so the next ingest embeds them again)", len(empty),
                             empty[:EXAMPLES]))
    return found


def _ids_finding(check: str, ids: list[int], what: str) -> list[Finding]:
    """One finding naming the first few of `ids`, or none when there are none."""
    if not ids:
        return []
    return [Finding(check, f"{len(ids)} {what}", len(ids), [str(i) for i in ids[:EXAMPLES]])]


def _index_findings(collection: Collection, *, compare_vectors: bool) -> list[Finding]:
    store = collection.store
    hint = ("the next query rebuilds it from SQLite and saves it, unless an ingest holds the index; "
            "--repair rebuilds it now")
    try:
        index = VectorIndex.load(collection.index_path)
    except FileNotFoundError:
        return [Finding("index-file", f"the FAISS index file {collection.index_path} is missing ({hint})")]
    except IndexCorrupt as e:
        return [Finding("index-file", f"{e} ({hint})")]
    if index.dim != store.dim:
        return [Finding("index-file", f"the FAISS index holds {index.dim}-d vectors, SQLite {store.dim}-d ({hint})")]
    have, want = index.ids(), store.ids()
    behind = index.generation != store.generation
    why = f"; the file is from generation {index.generation}, SQLite is at {store.generation}" if behind else ""
    found = _ids_finding("index-missing", list(np.setdiff1d(want, have)),
                         f"segments in SQLite are missing from the FAISS index file ({hint}{why})")
    found += _ids_finding("index-extra", list(np.setdiff1d(have, want)),
                          f"ids in the FAISS index file have no segment in SQLite ({hint}{why})")
    if compare_vectors:
        found += _ids_finding("index-vectors", _differing_vectors(index, store, np.intersect1d(have, want)),
                              f"vectors in the FAISS index file differ from SQLite's ({hint})")
    if behind and not found:
        found.append(Finding("index-generation", f"the FAISS index file is tagged generation {index.generation}, "
                             f"SQLite is at {store.generation}, but their contents agree", problem=False))
    return found


def _print_findings(collection: Collection) -> list[Finding]:
    """The print lookup files against the fingerprints in SQLite (the lookup is derived from them)."""
    store = collection.store
    if not store.has_prints:
        return [Finding("prints-unavailable", "this index was made before fingerprints; the next 'audiosearch "
                        "ingest' fingerprints its files, until then queries find no verified duplicates",
                        problem=False)]
    found: list[Finding] = []
    if orphans := store.orphan_prints():
        found += _ids_finding("orphan-prints", orphans, "fingerprints belong to no file")
    total, printed = store.file_print_counts()
    if printed < total:
        found.append(Finding("unprinted-files", f"{total - printed} files have no fingerprint yet (the next "
                             "'audiosearch ingest' on their folders adds them)", total - printed, problem=False))
    hint = "the next query or ingest rebuilds it from SQLite; --repair does it now"
    try:
        lookup = print_lookup.load(collection.dir, verify=True)
    except LookupOutdated as e:
        return found + [Finding("prints-file", f"the print lookup is outdated: {e} ({hint})")]
    except LookupCorrupt as e:
        return found + [Finding("prints-file", f"the print lookup is damaged: {e} ({hint})")]
    if lookup is None:
        return found + [Finding("prints-file", f"the print lookup ({print_lookup.MANIFEST}) is missing ({hint})")]
    have = lookup.covered()
    found += _ids_finding("prints-missing", list(np.setdiff1d(store.print_ids(), have)),
                          f"fingerprints in SQLite are missing from the print lookup ({hint})")
    found += _ids_finding("prints-extra", list(np.setdiff1d(have, store.all_print_ids())),
                          f"fingerprints in the print lookup are gone from SQLite ({hint})")
    return found


def _differing_vectors(index: VectorIndex, store: Store, common: np.ndarray) -> list[int]:
    tolerance = 1e-3 if index.compressed else 1e-6  # fp16 codes round each component by up to ~5e-4
    differ: list[int] = []
    for ids, vectors in store.iter_vectors(VECTOR_BATCH):
        keep = np.isin(ids, common)
        if keep.any():
            gap = np.abs(index.reconstruct(ids[keep]) - vectors[keep]).max(axis=1)
            differ.extend(int(i) for i in ids[keep][gap > tolerance])
    return differ


def _disk_findings(store: Store) -> list[Finding]:
    gone, changed, unreadable = [], [], []
    for row in store.files():
        state = _disk_state(row.path)
        if state == "gone":
            gone.append(row.path)
        elif state == "unreadable":
            unreadable.append(row.path)
        elif (state.st_size, state.st_mtime) != (row.size, row.mtime) and not same_content(row.path, row.hash):
            changed.append(row.path)
    found = []
    if gone:
        found.append(Finding("files-gone", f"{len(gone)} indexed files are gone from disk (run 'audiosearch ingest' "
                             "on their folder to forget them)", len(gone), gone[:EXAMPLES], repairable=False))
    if changed:
        found.append(Finding("files-changed", f"{len(changed)} files changed on disk since they were indexed (run "
                             "'audiosearch ingest' on their folder to embed them again)", len(changed),
                             changed[:EXAMPLES], repairable=False))
    if unreadable:
        found.append(Finding("files-unreadable", f"{len(unreadable)} indexed files cannot be checked: their folder "
                             "is not readable (permission denied); they stay in the index", len(unreadable),
                             unreadable[:EXAMPLES], problem=False, repairable=False))
    return found


def _disk_state(path: str) -> os.stat_result | str:
    """The file's stat, 'unreadable' when permissions hide it, or 'gone'."""
    try:
        return os.stat(path)
    except PermissionError:
        return "unreadable"
    except OSError:
        pass
    try:
        return os.lstat(path)  # a broken symlink is still there
    except PermissionError:
        return "unreadable"
    except OSError:
        return "gone"


def _temp_files(collection: Collection) -> list[Finding]:
    stale = collection.stale_temp_files()
    if not stale:
        return []
    message = f"{len(stale)} temporary files left by interrupted index saves (repair removes them)"
    return [Finding("temp-files", message, len(stale), [p.name for p in stale[:EXAMPLES]], problem=False)]


def _repair(collection: Collection, findings: list[Finding]) -> list[str]:
    """Fix what `findings` call repairable; returns what was done, one line each."""
    checks = {f.check: f for f in findings}
    if "integrity" in checks:
        return ["nothing repaired: the database itself is damaged, and repairs would build on it"]
    done = _repair_sqlite(collection.store, checks) if checks.keys() & set(SQLITE_FINDINGS) else []
    if done or checks.keys() & set(INDEX_FINDINGS):
        index = collection.rebuild_index()
        done.append(f"rebuilt the FAISS index file from SQLite ({index.ntotal} vectors)")
    if checks.keys() & set(PRINT_FINDINGS):
        lookup = collection.rebuild_prints()
        done.append(f"rebuilt the print lookup from SQLite ({len(lookup.covered())} fingerprints)")
    elif done:
        collection.refresh_prints()  # the SQLite repairs may have dropped fingerprints: the lookup follows
    elif "temp-files" in checks:
        for stale in collection.stale_temp_files():
            stale.unlink(missing_ok=True)
        done.append(f"removed {checks['temp-files'].count} temporary files")
    return done


def _repair_sqlite(store: Store, checks: dict[str, Finding]) -> list[str]:
    done = []
    with store.transaction():
        if ids := store.orphan_segments():
            store.delete_segments(ids)
            done.append(f"deleted {len(ids)} segments that belonged to no file")
        if ids := store.unsearchable_segments():
            store.delete_segments(ids)
            done.append(f"deleted {len(ids)} segments of failed or skipped files")
        if ids := store.malformed_segments():
            paths = sorted({info[1] for info in store.segment_info(ids).values()})
            store.delete_segments(ids)
            store.delete_files(paths)
            done.append(f"deleted {len(ids)} malformed segments and forgot their {len(paths)} files")
        if n := store.orphan_label_rows():
            store.delete_orphan_label_rows()
            done.append(f"deleted {n} label rows that pointed at nothing")
        if ids := store.orphan_prints():
            store.delete_prints(ids)
            done.append(f"deleted {len(ids)} fingerprints that belonged to no file")
        if empty := store.empty_files():
            store.delete_files(empty)
            done.append(f"forgot {len(empty)} files that had no segments")
        if "label-counts" in checks or done:
            store.recount_labels()
            if "label-counts" in checks:
                done.append(f"recounted the segments of {checks['label-counts'].count} labels")
    return done
