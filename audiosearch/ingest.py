"""`audiosearch ingest`: bring an index up to date with folders of audio.

Only new and changed files are embedded (size + mtime, confirmed by content
hash); a renamed file with the same bytes is a move; files gone from the
folders are pruned. Results are committed to SQLite file by file in
transactions, so a run killed at any moment loses at most the files in
flight, and the next run picks up where it stopped. A long file's finished
segments are committed as it goes, in chunks (PARTIAL_SEGMENTS), outside the
searchable tables: an interrupted 2-hour file resumes from its last chunk, and
it becomes searchable, with its whole fingerprint, once all of it is in. The
progress bar follows a file's segments (`Progress.advance`), not only whole
files. The FAISS file is refreshed from SQLite at checkpoints and at the end.

Bad input never ends a run. A file that cannot be decoded (or whose decoder
crashes or hangs, see decode_pool) is recorded as failed with its error; one
that decodes to no samples at all is recorded as skipped; anything else is
embedded, a click of one sample or silence included (see embedder.MIN_SAMPLES). Failed and skipped files are not tried again until they change or
`retry_failed` is set. A truncated file whose header libsndfile can correct
(WAV, MP3) is indexed from the audio it holds. Folders that cannot be listed
and file names that are not UTF-8 are reported, and nothing indexed from such
a folder is pruned.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .audio import SEGMENT_SECONDS, file_format, is_audio_path
from .collection import Collection
from .decode_pool import content_hash
from .embedder import Embedder, FileEmbedding, SegmentEmbedding, Tally
from .errors import AudiosearchError, IndexWriteError, NoAudioFiles
from .index import SyncReport
from .match.lookup import SyncReport as PrintSyncReport
from .interrupts import Interrupted, signal_of
from .match.fingerprint import HEADER_BYTES as PRINT_HEADER_BYTES
from .match.fingerprint import PEAK_BYTES as PRINT_BYTES
from .match.fingerprint import VERSION as PRINT_VERSION
from .model_ref import DEFAULT_MODEL
from .store import FileRow, PrintRow, SegmentResult

COMMIT_SECONDS = 1.0  # longest a finished file waits before its transaction commits
CHECKPOINT_SECONDS = 60.0  # how often the FAISS file catches up during a long run


@dataclass(frozen=True)
class DiskFile:
    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Unreadable:
    """Something under the scanned paths that cannot be indexed, found while scanning."""

    path: str
    reason: str
    folder: bool = False  # a folder that could not be listed: the indexed files it held are kept


@dataclass
class IngestSummary(Tally):
    """What a run did, for the closing report."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    ignored: int = 0
    ignored_files: list[str] = field(default_factory=list)  # non-audio names, by path
    earlier_failures: int = 0  # unchanged files that failed or were skipped by an earlier run
    unlisted_folders: list[tuple[str, str]] = field(default_factory=list)  # folders that could not be read
    wall_seconds: float = 0.0
    index: SyncReport | None = None
    prints: PrintSyncReport | None = None
    pruned: bool = True
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: counts are what was finished (and committed)

    @property
    def segments_per_second(self) -> float:
        return self.segments / self.wall_seconds if self.wall_seconds else 0.0


class Progress(Protocol):
    """What ingest reports while it runs. `advance` (optional) follows a file's segments as they are
    embedded, so that a long file moves the bar; `update` comes once per finished file."""

    def start(self, files: int) -> None: ...
    def update(self, result: FileEmbedding) -> None: ...
    def advance(self, path: str, new: int, done: int, total: int) -> None: ...


@dataclass
class _Plan:
    embed: list[DiskFile] = field(default_factory=list)
    moves: list[tuple[str, DiskFile]] = field(default_factory=list)
    touches: list[DiskFile] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    unchanged: int = 0
    disk: list[DiskFile] = field(default_factory=list)
    unchanged_failed: int = 0  # of `unchanged`: files left failed or skipped from an earlier run


def ingest(
    paths: Iterable[str | Path],
    *,
    index_dir: str | Path,
    model: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    hop_seconds: float | None = None,
    prune: bool = True,
    retry_failed: bool = False,
    memory_budget_gib: float | None = None,
    durable: bool | None = None,
    progress: Progress | None = None,
) -> IngestSummary:
    """Embed what is new or changed under `paths` into the index at `index_dir`.

    `memory_budget_gib` is remembered by the index: above it, FAISS keeps vectors as float16.
    `durable` syncs every commit to disk (SQLite synchronous=FULL), so that a power loss loses
    nothing committed; default: AUDIOSEARCH_DURABLE.
    """
    started = time.perf_counter()
    summary = IngestSummary(pruned=prune)
    try:
        roots = [Path(os.path.abspath(p)) for p in paths]
        unreadable: list[Unreadable] = []
        disk, ignored_files = scan(roots, unreadable)
        summary.ignored, summary.ignored_files = len(ignored_files), ignored_files
        collection = Collection(index_dir, create=True, device=device, durable=durable)
        try:
            with collection.writing():
                if memory_budget_gib is not None:
                    collection.set_memory_budget(memory_budget_gib)
                _ingest_locked(
                    collection, roots, disk, unreadable, summary, model=model, device=device, precision=precision,
                    batch_size=batch_size, workers=workers, hop_seconds=hop_seconds, prune=prune,
                    retry_failed=retry_failed, progress=progress,
                )
        finally:
            collection.close()
    except KeyboardInterrupt as e:
        summary.interrupted = True
        summary.wall_seconds = time.perf_counter() - started
        raise Interrupted(signal_of(e), summary, "the files finished are committed (and a long file's finished "
                          "segments); the next ingest resumes from there") from None
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _ingest_locked(collection: Collection, roots: list[Path], disk: list[DiskFile], unreadable: list[Unreadable],
                   summary: IngestSummary, *, model, device, precision, batch_size, workers, hop_seconds, prune,
                   retry_failed, progress) -> None:
    store = collection.store
    _check_hop(collection, hop_seconds)
    unlisted = [Path(u.path) for u in unreadable if u.folder]
    plan = plan_changes(store.files(), disk, roots, prune=prune, retry_failed=retry_failed, unlisted=unlisted)
    _fingerprint_unprinted(plan, store.unprinted_paths())
    summary.unchanged, summary.moved, summary.removed = plan.unchanged, len(plan.moves), len(plan.remove)
    summary.earlier_failures = plan.unchanged_failed
    summary.failed.extend((u.path, u.reason) for u in unreadable if not u.folder)
    summary.unlisted_folders.extend((u.path, u.reason + "; the files indexed from it are kept")
                                    for u in unreadable if u.folder)
    if plan.remove or plan.moves or plan.touches:  # a transaction would bump the generation for nothing
        with store.transaction():
            store.delete_files(plan.remove)
            for old, new in plan.moves:
                store.move_file(old, _row(new))
            for f in plan.touches:
                store.touch_file(f.path, f.size, f.mtime)
    if plan.embed or model:
        from .model import Model  # torch: only when there is something to embed or a model to bind
    if plan.embed:
        hop = hop_seconds or float(collection.meta.get("hop_seconds", SEGMENT_SECONDS))
        net = Model(model or collection.model_name or DEFAULT_MODEL, device=device, precision=precision,
                    auto_int8=True)
        collection.bind_model(net, hop_seconds=hop)
        collection.record_precision(net.precision)
        embedder = Embedder(net, batch_size=batch_size, workers=workers, hop_seconds=hop)
        _embed(collection, embedder, plan.embed, summary, progress)
    elif model:
        collection.bind_model(Model(model, device=device, precision=precision), hop_seconds=hop_seconds or SEGMENT_SECONDS)
    _, summary.index = collection.refresh_index()
    summary.prints = collection.refresh_prints()


def _fingerprint_unprinted(plan: _Plan, unprinted: set[str]) -> None:
    """Files indexed before fingerprints existed are embedded again, once, to get theirs."""
    if not unprinted:
        return
    planned = {f.path for f in plan.embed} | {f.path for f in plan.touches}
    again = [f for f in plan.disk if f.path in unprinted and f.path not in planned]
    plan.embed.extend(again)
    plan.unchanged -= len(again)


def _check_hop(collection: Collection, hop_seconds: float | None) -> None:
    """One hop per index: segments cut at another spacing would mix two different indexes into one."""
    stored = collection.meta.get("hop_seconds")
    if hop_seconds is not None and stored is not None and abs(float(stored) - hop_seconds) > 1e-9:
        raise AudiosearchError(
            f"index {collection.dir} cuts segments every {float(stored):g} s, not {hop_seconds:g} s; omit --hop "
            "to keep its hop, or build a new index with another --index"
        )


def scan(roots: list[Path], unreadable: list[Unreadable] | None = None) -> tuple[list[DiskFile], list[str]]:
    """Audio files under the given files and folders (symlinks followed, loops cut), and the others, ignored.

    A file reached by two names (a symlink and its target, or hard links) is listed once, by its real path
    when that is under the scanned paths (see `_preferred`).

    Folders that cannot be listed and names that are not valid UTF-8 (SQLite keeps text as UTF-8) are
    appended to `unreadable`. A broken or looping symlink with an audio name is returned, with the
    link's own size and time, so that it is recorded as failed rather than silently left out.
    """
    unreadable = [] if unreadable is None else unreadable
    found: dict[tuple[int, int], DiskFile] = {}  # by (device, inode): a file reached twice is indexed once
    ignored: list[str] = []
    for root in roots:
        if not root.exists():
            raise AudiosearchError(f"no such file or folder: {root}")
        for path in _walk(root, unreadable):
            if not is_audio_path(Path(path)):
                ignored.append(path)
            elif not _utf8(path):
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                unreadable.append(Unreadable(shown, "file name is not valid UTF-8; rename the file to index it"))
            elif (st := disk_stat(path)) is not None:
                same = found.get((st.st_dev, st.st_ino))
                if same is None or _preferred(path, same.path):
                    found[(st.st_dev, st.st_ino)] = DiskFile(path, st.st_size, st.st_mtime)
    if not found:
        where = ", ".join(str(r) for r in roots)
        raise NoAudioFiles(f"no audio files found in {where} (looked for {', '.join(_shown_extensions())})")
    return sorted(found.values(), key=lambda f: f.path), ignored


def _preferred(path: str, other: str) -> bool:
    """Of two names for one file (a symlink and its target, hard links), keep its real path if both are
    under the scanned folders, else the one that sorts first, so every run picks the same."""
    real = os.path.realpath(path)
    if real in (path, other):
        return real == path
    return path < other


def _walk(root: Path, unreadable: list[Unreadable]) -> Iterable[str]:
    if root.is_file():
        yield str(root)
        return
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            unreadable.append(Unreadable(folder, f"cannot list folder: {e.strerror or e}", folder=True))
            continue
        for entry in entries:
            kind = _kind(entry)
            if kind == "dir":
                stack.append(entry.path)
            elif kind is not None:
                yield entry.path


def _kind(entry: os.DirEntry) -> str | None:
    """'dir', 'file', 'link' (a symlink that is broken or loops), or None (FIFOs, sockets, entries gone)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:
        pass
    try:
        return "link" if entry.is_symlink() else None
    except OSError:
        return None


def disk_stat(path: str) -> os.stat_result | None:
    """The file's stat, the link's own for a broken symlink, None for a file gone since it was listed."""
    for stat in (os.stat, os.lstat):
        try:
            return stat(path)
        except OSError:
            continue
    return None


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def plan_changes(known: list[FileRow], disk: list[DiskFile], roots: list[Path], *, prune: bool,
                 retry_failed: bool, unlisted: Sequence[Path] = ()) -> _Plan:
    """Sort files into embed / move / touch / remove / unchanged.

    Files under `unlisted` folders (which could not be read this time) are neither pruned nor moved.
    """
    plan = _Plan(disk=disk)
    by_path = {row.path: row for row in known}
    on_disk = {f.path for f in disk}
    vanished = [r for r in known if _under(r.path, roots) and not _under(r.path, unlisted) and r.path not in on_disk]
    vanished_by_size: dict[int, list[FileRow]] = {}
    for row in vanished:
        if row.status == "ok":
            vanished_by_size.setdefault(row.size, []).append(row)
    moved_from: set[str] = set()
    for f in disk:
        row = by_path.get(f.path)
        if (row and row.size == f.size and row.mtime == f.mtime and (row.status == "ok" or not retry_failed)
                and not _once_too_short(row)):
            plan.unchanged += 1
            plan.unchanged_failed += row.status != "ok"
        elif row and row.status == "ok" and row.size == f.size and same_content(f.path, row.hash):
            plan.touches.append(f)
            plan.unchanged += 1
        elif (source := _moved_from(f, vanished_by_size, moved_from)) is not None:
            plan.moves.append((source, f))
        else:
            plan.embed.append(f)
    if prune:
        plan.remove = [r.path for r in vanished if r.path not in moved_from]
    return plan


def _once_too_short(row: FileRow) -> bool:
    """Skipped by an earlier version as under 0.1 s: every such file is embedded now."""
    return row.status == "skipped" and (row.error or "").startswith("too short to embed")


def _moved_from(f: DiskFile, vanished_by_size: dict[int, list[FileRow]], taken: set[str]) -> str | None:
    candidates = [r for r in vanished_by_size.get(f.size, []) if r.path not in taken and r.hash]
    digests: dict[bool, str | None] = {}  # by "is a legacy digest": the file is hashed at most once per kind
    for row in candidates:
        legacy = ":" not in row.hash
        if legacy not in digests:
            digests[legacy] = _hash_or_none(f.path, like=row.hash)
        if digests[legacy] == row.hash:
            taken.add(row.path)
            return row.path
    return None


def same_content(path: str, digest: str | None) -> bool:
    """Whether the file's bytes still hash to `digest` (with the algorithm that made it)."""
    return digest is not None and _hash_or_none(path, like=digest) == digest


def _hash_or_none(path: str, like: str | None = None) -> str | None:
    try:
        return content_hash(path, like)
    except OSError:
        return None


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots)


def _embed(collection: Collection, embedder: Embedder, files: list[DiskFile], summary: IngestSummary,
           progress: Progress | None) -> None:
    known = {row.path for row in collection.store.files()}
    if progress:
        progress.start(len(files))
    writer = _Writer(collection.dir, collection.device, collection.store.durable)
    writer.start()
    partials = _Partials(collection.store, writer, progress)
    try:
        with closing(embedder.run(((f, f.path) for f in files), with_hash=True, with_prints=True,
                                  on_segments=partials.on_segments, known=partials.known)) as results:
            for result in results:
                partials.finished(result)
                writer.put(result)
                _count(summary, result, result.path in known)
                if progress:
                    progress.update(result)
    finally:
        writer.finish()
    if collection.store.partial_count():  # every file finished: what is left belongs to files since changed
        with collection.store.transaction():
            collection.store.clear_partials()


PARTIAL_SEGMENTS = 32  # a long file's finished segments are committed in chunks of this many (~5.5 min of audio)


@dataclass
class _Partial:
    """Finished segments of a file still being embedded, to keep across an interrupt."""

    hash: str
    segments: list[SegmentResult]


class _Partials:
    """Progress within a file, and its finished segments committed as it goes (files of more than
    PARTIAL_SEGMENTS segments): an interrupted 2-hour file resumes where it stopped, by content hash.
    The file itself is written (and searchable) only once all its segments are in, fingerprint included."""

    def __init__(self, store, writer: _Writer, progress: Progress | None):
        self.store, self.writer = store, writer
        self.advance = getattr(progress, "advance", None)
        self.unsaved: dict[str, list[SegmentEmbedding]] = {}

    def on_segments(self, result: FileEmbedding, new: list[SegmentEmbedding], done: int, total: int) -> None:
        if self.advance is not None:
            self.advance(result.path, len(new), done, total)
        if not result.hash or done == total:  # not `total`: until the last part it is the header's estimate
            return
        pending = self.unsaved.setdefault(result.path, [])
        pending.extend(new)
        if len(pending) >= PARTIAL_SEGMENTS:
            self.writer.put(_Partial(result.hash, [SegmentResult(s.start, s.end, s.embedding, s.scores)
                                                   for s in pending]))
            self.unsaved[result.path] = []

    def known(self, decoded) -> dict[tuple[float, float], SegmentEmbedding]:
        if not decoded.hash:
            return {}
        return {(s.start, s.end): SegmentEmbedding(s.start, s.end, s.vector, s.scores)
                for s in self.store.partial_segments(decoded.hash)}

    def finished(self, result: FileEmbedding) -> None:
        self.unsaved.pop(result.path, None)


def _count(summary: IngestSummary, result: FileEmbedding, known: bool) -> None:
    if summary.count(result):
        summary.updated += known
        summary.added += not known


def _row(f: DiskFile, result: FileEmbedding | None = None) -> dict:
    row = {"path": f.path, "size": f.size, "mtime": f.mtime}
    if result is not None:
        row.update(
            hash=result.hash, duration=result.duration, sample_rate=result.sample_rate, channels=result.channels,
            status=result.status, error=result.error,
        )
        if result.status == "ok":
            row["format"], row["subtype"] = file_format(f.path)
    return row


class _Writer(threading.Thread):
    """Commits finished files to SQLite off the model's thread, and checkpoints the FAISS file."""

    def __init__(self, index_dir: Path, device: str, durable: bool):
        super().__init__(name="audiosearch-writer", daemon=True)
        self.index_dir, self.device, self.durable = index_dir, device, durable
        self.queue: queue.Queue = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self.ended = False  # the end marker has been taken from the queue

    def put(self, result: FileEmbedding | _Partial) -> None:
        if self.error:
            raise self.error
        self.queue.put(result)

    def finish(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error:
            raise self.error

    def run(self) -> None:
        collection = Collection(self.index_dir, device=self.device, durable=self.durable)
        try:
            self._loop(collection)
        except BaseException as e:
            self.error = _write_error(self.index_dir, e)
            while not self.ended and self.queue.get() is not None:  # keep the producer from blocking
                pass
        finally:
            collection.close()

    def _loop(self, collection: Collection) -> None:
        last_checkpoint = time.monotonic()
        index = None
        done = False
        while not done:
            batch, done = self._drain()
            if batch:
                with collection.store.transaction():
                    for item in batch:
                        if isinstance(item, _Partial):
                            collection.store.save_partial(item.hash, item.segments)
                        else:
                            collection.store.write_file(_row(item.key, item), _segments(item), _prints(item))
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                index, _ = collection.refresh_index(index)
                collection.refresh_prints()
                last_checkpoint = time.monotonic()

    def _drain(self) -> tuple[list[FileEmbedding], bool]:
        """Files that finished within COMMIT_SECONDS; True once the run is over."""
        batch: list[FileEmbedding] = []
        deadline = time.monotonic() + COMMIT_SECONDS
        while (wait := deadline - time.monotonic()) > 0:
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                break
            if item is None:
                self.ended = True
                return batch, True
            batch.append(item)
        return batch, False


def _write_error(index_dir: Path, e: BaseException) -> BaseException:
    """A full disk or an I/O error becomes one actionable line; anything else is a bug and stays as it is."""
    if not isinstance(e, (sqlite3.OperationalError, OSError)):
        return e
    error = IndexWriteError(f"cannot write to the index at {index_dir} ({e}); the files committed before are kept "
                            "and the next run resumes from them")
    error.__cause__ = e
    return error


def _prints(result: FileEmbedding) -> PrintRow | None:
    if result.status != "ok" or result.prints is None:
        return None
    return PrintRow(PRINT_VERSION, (len(result.prints) - PRINT_HEADER_BYTES) // PRINT_BYTES, result.prints)


def _segments(result: FileEmbedding) -> list[SegmentResult]:
    return [SegmentResult(s.start, s.end, s.embedding, s.scores) for s in result.segments]


def _shown_extensions() -> list[str]:
    return [".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", "..."]
