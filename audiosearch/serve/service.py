"""What `audiosearch serve` does, without HTTP: search, decode uploads safely, hand out library files by id.

One `Searcher` (model, FAISS index, fingerprint lookup) is loaded once and used by one
thread: every search, from any number of concurrent requests, queues for it, so the model
is never loaded twice nor run by two threads at once. Uploads are decoded in worker
processes under a time limit, so a file that hangs or crashes a decoder costs that worker,
not the server. Library files are found by their id in the index, never by a path from the
client, and sent only while their bytes are still the ones that were indexed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path

from ..audio import AUDIO_EXTENSIONS, Audio
from ..collection import Collection
from ..containers import FFMPEG_EXTENSIONS
from ..decode_pool import Decoder, content_hash_fd
from ..errors import AudioDecodeError, AudiosearchError
from ..query import Searcher
from ..store import FileRow
from .media import OpenFile, browser_type, peaks, write_wav

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server."""

    upload_bytes: int = 64 * MiB  # an upload (the whole request body) larger than this gets 413
    decode_seconds: float = 10.0  # decoding an upload; past this its decoder is killed and the upload refused
    clip_seconds: float = 600.0  # a query clip (upload or library file) longer than this is refused
    library_decode_seconds: float = 120.0  # decoding a library file (a query by id, a transcode, a waveform)
    max_k: int = 100


class NotFound(AudiosearchError):
    """No such file in the index (HTTP 404)."""


class Busy(AudiosearchError):
    """Asked for work that is under way for someone else, or while stopping: ask again later (503)."""


class FileChanged(AudiosearchError):
    """The library file on disk is no longer the one that was indexed (HTTP 409)."""


class TooLarge(AudiosearchError):
    """An upload or clip over the server's limits (HTTP 413)."""


_DECODE_WORKERS = 2  # processes decoding uploads and library files at once
_PEAKS_CACHED = 512


class Service:
    """The index at `index_dir` and its model, opened once, for many requests from many threads."""

    def __init__(self, index_dir: str | Path, *, model: str | None = None, device: str = "auto",
                 precision: str = "auto", limits: Limits = Limits()):
        self.index_dir, self.limits = Path(index_dir), limits
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="audiosearch-model")
        self._decode_threads = ThreadPoolExecutor(_DECODE_WORKERS, thread_name_prefix="audiosearch-decode")
        self._decoders = threading.local()
        self._all_decoders: list[Decoder] = []
        self._db = Collection(index_dir)  # metadata reads, beside the searcher's connection
        self._db_lock = threading.Lock()
        self._verified: dict[tuple, str] = {}  # (dev, inode, size, mtime_ns) -> the hash checked
        self._peaks: OrderedDict[tuple, dict] = OrderedDict()
        self._peaks_lock = threading.Lock()
        self._transcode_locks: dict[int, threading.Lock] = {}
        self._dupes_lock = threading.Lock()
        self._closing = threading.Event()
        self.cache = Path(tempfile.mkdtemp(prefix="audiosearch-serve-"))
        try:
            self.searcher: Searcher = self._model_thread.submit(
                _open_searcher, index_dir, model, device, precision).result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker threads and decoder processes, drop the transcode cache."""
        self._closing.set()
        for decoder in self._all_decoders:
            decoder.close()
        self._decode_threads.shutdown(wait=True)
        if getattr(self, "searcher", None) is not None:
            self._model_thread.submit(self.searcher.close).result()
        self._model_thread.shutdown(wait=True)
        self._db.close()
        shutil.rmtree(self.cache, ignore_errors=True)

    # -- searching -----------------------------------------------------------
    def query_upload(self, data_path: Path, name: str, **options) -> dict:
        """Search with an uploaded clip, saved at `data_path` (the client's file `name` is shown, never opened)."""
        if data_path.stat().st_size == 0:
            raise AudioDecodeError(f"the upload {name} is empty (0 bytes)")
        started = time.perf_counter()
        try:
            audio = self._decode(data_path, self.limits.decode_seconds)
        except AudioDecodeError as e:
            raise AudioDecodeError(f"the upload {name} is {e}") from e
        return self._search(audio, name, options, decoded_in=time.perf_counter() - started)

    def query_file(self, file_id: int, **options) -> dict:
        """Search with a library file, as `audiosearch query PATH` would."""
        row = self._file(file_id)
        with self._checked_fd(row):
            pass
        started = time.perf_counter()
        audio = self._decode(Path(row.path), self.limits.library_decode_seconds)
        return self._search(audio, row.path, options, decoded_in=time.perf_counter() - started)

    def _search(self, audio: Audio, name: str, options: dict, decoded_in: float) -> dict:
        if audio.duration > self.limits.clip_seconds:
            raise TooLarge(f"{name} is {audio.duration:.0f} s long; the server searches with clips of up to "
                           f"{self.limits.clip_seconds:g} s (cut it shorter)")
        if not 1 <= options.get("k", 10) <= self.limits.max_k:
            raise AudiosearchError(f"k must be between 1 and {self.limits.max_k}")
        result = self._model_thread.submit(self.searcher.query, audio, name=name, **options).result()
        out = result.to_dict()
        out["query_duration"] = round(audio.duration, 3)
        timings = {"decode": decoded_in, **result.timings}
        out["timings_ms"] = {stage: round(s * 1000, 2) for stage, s in timings.items()}
        return out

    def dupes(self, *, min_seconds: float = 0.0, kinds: list[str] | None = None, labels: list[str] | None = None,
              similar: float | None = None) -> dict:
        """The library's duplicate report, as `audiosearch dupes --json` prints it.

        Files new since the last report are matched first (the pairs are kept in the index), so
        the first call on a big library takes as long as `audiosearch dupes` does; one at a time.
        """
        from ..match.dupes import find_dupes

        if not self._dupes_lock.acquire(blocking=False):  # a request does not wait, holding a thread, for another's
            raise Busy("the duplicates report is being made for another request; ask again when it is done")
        try:
            done: Future = Future()

            def work() -> None:
                try:
                    done.set_result(find_dupes(self.index_dir, min_seconds=min_seconds, kinds=kinds, labels=labels,
                                               similar=similar).to_dict())
                except BaseException as e:
                    done.set_exception(e)

            # a daemon thread: a server stopped meanwhile exits at once (the pairs are derived, and SQLite
            # rolls back what was not committed)
            threading.Thread(target=work, name="audiosearch-dupes", daemon=True).start()
            while True:
                try:
                    return done.result(timeout=0.5)
                except FutureTimeout:
                    if self._closing.is_set():
                        raise Busy("the server is stopping") from None
                except ValueError as e:  # an unknown kind
                    raise AudiosearchError(str(e)) from e
        finally:
            self._dupes_lock.release()

    # -- decoding, in worker processes -----------------------------------------
    def _decode(self, path: Path, timeout: float) -> Audio:
        return self._decode_threads.submit(self._decode_here, path, timeout).result()

    def _decode_here(self, path: Path, timeout: float) -> Audio:
        decoder = getattr(self._decoders, "decoder", None)
        if decoder is None:  # one per decode thread, started by it: it lives as long as the thread
            decoder = self._decoders.decoder = Decoder()
            self._all_decoders.append(decoder)
        return decoder.decode(path, timeout=timeout)

    # -- the library -------------------------------------------------------------
    def info(self) -> dict:
        with self._db_lock:
            meta, stats = self._db.meta, self._db.store.stats()
        return {"index": str(self.index_dir.resolve()), "model": meta.get("model"),
                "precision": self.searcher.net.precision, "device": str(self.searcher.net.device),
                "files": stats["files"], "segments": stats["segments"], "hours": round(stats["hours"], 4),
                "limits": asdict(self.limits), "dupes": False}

    def labels(self) -> list[dict]:
        with self._db_lock:
            rows = self._db.store.label_file_counts()
        return [{"label": name, "files": files, "segments": segments} for name, files, segments in rows]

    def library(self) -> dict:
        """The overview: files by label, and the files that failed with their reasons."""
        with self._db_lock:
            failed = [r for r in self._db.store.files() if r.status != "ok"]
            stats = self._db.store.stats()
        return {"files": stats["files"], "labels": self.labels(),
                "failed": [{"path": r.path, "status": r.status, "error": r.error} for r in failed]}

    def find_files(self, text: str = "", *, label: str | None = None, limit: int = 50) -> list[dict]:
        with self._db_lock:
            rows = self._db.store.find_files(text, label=label, limit=max(1, min(limit, 500)))
        return [{"file_id": i, "path": path, "duration": round(d, 3)} for i, path, d in rows]

    def _file(self, file_id: int) -> FileRow:
        with self._db_lock:
            row = self._db.store.file(file_id)
        if row is None or row.status != "ok":
            raise NotFound(f"no file with id {file_id} in the index")
        return row

    # -- library files, by id ------------------------------------------------------
    def open_audio(self, file_id: int) -> OpenFile:
        """The file as the browser can play it: its own bytes, or a WAV transcode of them."""
        row = self._file(file_id)
        media_type = browser_type(row.path)
        if media_type is not None:
            fd = self._checked_fd(row)
            return OpenFile(fd, os.fstat(fd).st_size, media_type)
        wav = self._transcode(row)
        fd = os.open(wav, os.O_RDONLY)
        return OpenFile(fd, os.fstat(fd).st_size, "audio/wav", transcoded=True)

    def waveform(self, file_id: int, bins: int = 400) -> dict:
        """Peaks for a thumbnail of the file's waveform (cached), with its duration in seconds."""
        row = self._file(file_id)
        bins = max(16, min(bins, 2000))
        key = (file_id, row.hash, bins)
        with self._peaks_lock:
            if key in self._peaks:
                self._peaks.move_to_end(key)
                return self._peaks[key]
        with self._checked_fd(row):
            pass
        audio = self._decode(Path(row.path), self.limits.library_decode_seconds)
        out = {"file_id": file_id, "duration": round(audio.duration, 3), "peaks": peaks(audio.samples, bins)}
        with self._peaks_lock:
            self._peaks[key] = out
            while len(self._peaks) > _PEAKS_CACHED:
                self._peaks.popitem(last=False)
        return out

    def _transcode(self, row: FileRow) -> Path:
        wav = self.cache / f"{row.id}-{(row.hash or 'nohash').replace(':', '-')}.wav"
        with self._transcode_locks.setdefault(row.id, threading.Lock()):
            if not wav.exists():
                with self._checked_fd(row):
                    pass
                audio = self._decode(Path(row.path), self.limits.library_decode_seconds)
                write_wav(wav, audio.samples)
        return wav

    def _checked_fd(self, row: FileRow) -> "_Fd":
        """An open descriptor of the indexed file, only while it is a regular file with the indexed bytes.

        The path comes from the index, never from the client. A file swapped since ingest (for
        another file, or for a symlink out of the library) has other bytes and is refused.
        """
        try:
            fd = os.open(row.path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise FileChanged(f"{row.path} cannot be opened ({e.strerror}); it moved or was deleted since it "
                              "was indexed: run 'audiosearch ingest' again") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged(f"{row.path} is no longer a regular file; run 'audiosearch ingest' again")
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if row.hash is not None and self._verified.get(key) != row.hash:
                if content_hash_fd(fd, like=row.hash) != row.hash:
                    raise FileChanged(f"{row.path} has changed since it was indexed; run 'audiosearch ingest' "
                                      "again to index and play it")
                self._verified[key] = row.hash
            elif row.hash is None and st.st_size != row.size:
                raise FileChanged(f"{row.path} has changed since it was indexed; run 'audiosearch ingest' again")
        except BaseException:
            os.close(fd)
            raise
        return _Fd(fd)


class _Fd(int):
    """A file descriptor that is also a context manager closing it."""

    def __enter__(self) -> int:
        return int(self)

    def __exit__(self, *exc) -> None:
        os.close(self)


def upload_suffix(filename: str | None) -> str:
    """The upload's extension when it is one the decoder knows (it picks FFmpeg or libsndfile), else none:
    libsndfile then goes by the content. Nothing else of the client's name is used."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix in AUDIO_EXTENSIONS or suffix in FFMPEG_EXTENSIONS else ""


def _open_searcher(index_dir: str | Path, model: str | None, device: str, precision: str) -> Searcher:
    searcher = Searcher(index_dir, model=model, device=device, precision=precision)
    try:
        searcher.load()
    except BaseException:
        searcher.close()
        raise
    return searcher
