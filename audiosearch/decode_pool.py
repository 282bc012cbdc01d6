"""Decoding in worker processes, isolated so that one bad file cannot end a run.

libsndfile and its codecs can crash natively on malformed files. Each worker
decodes one file at a time over its own pipe, so when a worker dies the pool
knows exactly which file killed it, reports that file as failed, and starts a
new worker. A background thread keeps the workers busy and fills a bounded
queue, so decoding runs while the model computes. Workers are forked on Linux
(as torch's DataLoader does): they never touch torch or CUDA, and a script
using the API needs no `if __name__ == "__main__"` guard.

No worker outlives the process that started it, whatever ends that process
(SIGKILL included): each asks the kernel for SIGKILL when its parent dies
(Linux PR_SET_PDEATHSIG) and checks its parent's pid while idle, for the
moment before that took effect and for systems without it. A worker ignores
SIGINT and SIGTERM: Ctrl-C reaches the whole foreground process group, and
stopping is the parent's call (it kills its workers when it stops early).
Locks the parent holds are closed in the child right after fork (locks.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path

import numpy as np
import xxhash

from .audio import Audio, decode, decode_into, why_unreadable
from .errors import AudioDecodeError, AudiosearchError

DECODE_TIMEOUT = 600.0  # seconds one file may take before its worker is killed
PARENT_CHECK_SECONDS = 1.0  # how often an idle worker checks that its parent is alive
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_DONE = object()
_HASH_BLOCK = 1 << 22


@dataclass
class Decoded:
    """The outcome for one file: audio or an error, never both."""

    key: object  # the caller's handle for the file
    path: str
    audio: Audio | None = None
    hash: str | None = None
    error: str | None = None
    prints: bytes | None = None  # the fingerprint (match.fingerprint), when asked for


def _with_prints(result: Decoded, samples: np.ndarray | None = None) -> Decoded:
    """Fingerprint the decoded samples here, in the decoder, off the model's process."""
    if result.audio is not None:
        from .match.fingerprint import fingerprint

        result.prints = fingerprint(result.audio.samples if samples is None else samples).to_bytes()
    return result


def content_hash(path: str | Path, like: str | None = None) -> str:
    """"xxh3:<hex>", XXH3-128 of the file's bytes: identifies content across renames and touches.

    Not a security boundary, so the fastest good hash: BLAKE2b took 2 ms of a
    decoder's ~3 ms per 10.24 s segment of 44.1 kHz stereo WAV, XXH3 takes 0.1.
    Indexes written before XXH3 hold bare BLAKE2b-128 hex digests: pass one as
    `like` to hash the file the same way and compare.
    """
    with open(path, "rb", buffering=0) as f:
        return content_hash_fd(f.fileno(), like)


def content_hash_fd(fd: int, like: str | None = None) -> str:
    """`content_hash` of an open file, read from its start without moving its offset: the server
    checks the very file it then sends."""
    legacy = like is not None and ":" not in like
    h = hashlib.blake2b(digest_size=16) if legacy else xxhash.xxh3_128()
    # no bigger than the file: zeroing a 4 MiB buffer cost 30x the hash of a 1 s clip
    block = bytearray(min(_HASH_BLOCK, os.fstat(fd).st_size + 1))
    view = memoryview(block)
    offset = 0
    while n := os.preadv(fd, [block], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest() if legacy else f"xxh3:{h.hexdigest()}"


def decode_one(key: object, path: str, with_hash: bool, decoder: Callable[[str], Audio] = decode,
               with_prints: bool = False) -> Decoded:
    """Decode a file, turning every expected failure into `Decoded.error`."""
    try:
        digest = content_hash(path) if with_hash else None
        result = Decoded(key, path, decoder(path), digest)
        return _with_prints(result) if with_prints and decoder is decode else result
    except AudiosearchError as e:
        return Decoded(key, path, error=str(e))
    except OSError as e:
        return Decoded(key, path, error=why_unreadable(path) or f"cannot read file: {e.strerror or e}")


def _worker(conn: Connection, with_hash: bool, nice: int = 0, with_prints: bool = False,
            parent: int = 0) -> None:
    _die_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    while True:
        try:
            if not conn.poll(PARENT_CHECK_SECONDS):
                if os.getppid() != parent:  # orphaned (re-parented): no one will read the result
                    return
                continue
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        _decode_and_send(conn, *task, with_hash, with_prints)


def _die_with_parent(parent: int) -> None:
    """Leave signals to the parent, and have the kernel kill this worker when the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the idle check remains
            pass
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


# Decoded samples travel in shared memory: the worker decodes straight into a memfd and passes
# its descriptor over its socket. Pickled through the pipe, they cost the receiving process
# 0.5 ms of CPU per 10.24 s segment: at a GPU's pace (1,500 segments/s) a whole core, in the
# process that drives the model.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page in one call instead of faulting each in


def _decode_and_send(conn: Connection, key: object, path: str, with_hash: bool, with_prints: bool = False) -> None:
    try:
        fd = os.memfd_create("audiosearch-decoded", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd (not Linux), or out of descriptors: through the pipe
        conn.send((decode_one(key, path, with_hash, with_prints=with_prints), 0))
        return
    try:
        with open(fd, "wb", closefd=False) as sink:

            def into_shared_memory(p: str) -> Audio:
                rate, channels = decode_into(p, lambda block: sink.write(np.ascontiguousarray(block).data))
                return Audio(np.empty(0, np.float32), rate, channels)  # the samples follow as a descriptor

            result = decode_one(key, path, with_hash, into_shared_memory)
            size = sink.tell() // 4 if result.audio is not None else 0
        if with_prints and result.audio is not None:
            _fingerprint_shared(result, fd, size)
        conn.send((result, size))
        if size:
            send_handle(conn, fd, 0)
    finally:
        os.close(fd)


def _fingerprint_shared(result: Decoded, fd: int, size: int) -> None:
    """Fingerprint the samples just written to the memfd (read back from memory, not decoded again)."""
    if size == 0:
        _with_prints(result, np.zeros(0, np.float32))
        return
    with mmap.mmap(fd, size * 4, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as view:
        samples = np.frombuffer(view, dtype=np.float32)
        try:
            _with_prints(result, samples)
        finally:
            del samples


def _receive(conn: Connection) -> Decoded:
    result, size = conn.recv()
    if not size:
        return result
    try:
        fd = recv_handle(conn)
    except RuntimeError:  # the message came, its descriptor did not: this process has none left
        return _lost(result, "too many open files")
    try:
        shared = mmap.mmap(fd, size * 4, flags=mmap.MAP_SHARED | _POPULATE, **_UNTRACKED)
    except OSError as e:  # this file's audio is lost; the worker is fine
        return _lost(result, e.strerror or str(e))
    finally:
        os.close(fd)  # the mapping keeps the memory, until the last view of the samples is freed
    if _UNTRACKED or len(_live_mappings) < MAX_LIVE_MAPPINGS:
        _live_mappings.add(shared)
        samples = np.frombuffer(shared, dtype=np.float32)
    else:  # held on to by the caller: copy, so that descriptors do not run out
        samples = np.frombuffer(shared, dtype=np.float32).copy()
        shared.close()
    result.audio = replace(result.audio, samples=samples)
    return result


def _lost(result: Decoded, reason: str) -> Decoded:
    return Decoded(result.key, result.path, hash=result.hash, error=f"cannot receive decoded audio: {reason}")


# Before Python 3.13 a mapping keeps a duplicate of its file descriptor for as long as it lives,
# so each decoded file the caller still holds (queued, in a batch, kept by the caller) holds
# a descriptor. Past MAX_LIVE_MAPPINGS, samples are copied out and the mapping closed: well
# under the usual limit of 1,024 descriptors, whatever the batch size.
_UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}
MAX_LIVE_MAPPINGS = 256
_live_mappings: weakref.WeakSet = weakref.WeakSet()


class DecodePool:
    """Decode files in `workers` processes (0: in this process), yielding results as they finish.

    `nice` lowers the workers' scheduling priority: when the model computes on
    the same CPU cores, decoding then fills the model's idle moments instead of
    slowing every one of its threads (a parallel op runs at its slowest thread's pace).
    """

    def __init__(self, workers: int, *, with_hash: bool = False, prefetch: int = 8, nice: int = 0,
                 with_prints: bool = False):
        self.workers, self.with_hash, self.prefetch, self.nice = workers, with_hash, prefetch, nice
        self.with_prints = with_prints  # also fingerprint each file (ingest)

    def map(self, tasks: Iterable[tuple[object, str]]) -> Iterator[Decoded]:
        """Yield one Decoded per (key, path) task, in completion order."""
        if self.workers <= 0:
            for key, path in tasks:
                yield decode_one(key, path, self.with_hash, with_prints=self.with_prints)
            return
        out: queue.Queue = queue.Queue(maxsize=max(self.prefetch, self.workers))
        stop = threading.Event()
        runner = threading.Thread(target=self._run, args=(iter(tasks), out, stop), daemon=True)
        runner.start()
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            runner.join()

    def _run(self, tasks: Iterator[tuple[object, str]], out: queue.Queue, stop: threading.Event) -> None:
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        slots: list[_Slot] = []
        try:  # starting a worker can fail too (e.g. inside a daemonic process): never leave map() waiting
            for _ in range(self.workers):
                slots.append(_Slot(ctx, self.with_hash, self.nice, self.with_prints))
            self._loop(slots, tasks, out, stop)
            _put(out, _DONE, stop)
        except BaseException as e:  # hand any failure to the consuming thread
            _put(out, e, stop)
        finally:
            for slot in slots:  # stopped early (an interrupt, the consumer gone): what they decode is not wanted
                slot.close(kill=stop.is_set())

    def _loop(self, slots: list[_Slot], tasks: Iterator, out: queue.Queue, stop: threading.Event) -> None:
        exhausted = False
        while not stop.is_set():
            for slot in slots:
                if slot.task is None and not exhausted:
                    task = next(tasks, None)
                    exhausted = task is None
                    if task is not None:
                        slot.submit(task)
            busy = [s for s in slots if s.task is not None]
            if not busy:
                return
            ready = wait([s.conn for s in busy], timeout=0.5)
            for slot in busy:
                result = slot.collect(slot.conn in ready)
                if result is not None:
                    _put(out, result, stop)


class Decoder:
    """One decoder process kept warm for files that come one at a time (the server's uploads).

    `decode(path, timeout=...)` returns the Audio or raises AudioDecodeError. A file that crashes
    the decoder or takes longer than `timeout` costs only the worker, which is killed and
    replaced: the calling process goes on. One call at a time; create and use it from one
    long-lived thread (the worker's PR_SET_PDEATHSIG fires when the thread that started it ends).
    """

    def __init__(self) -> None:
        self._slot: _Slot | None = None

    def decode(self, path: str | Path, *, timeout: float = DECODE_TIMEOUT) -> Audio:
        if self._slot is None:
            self._slot = _Slot(mp.get_context("fork" if sys.platform == "linux" else "spawn"), False)
        slot = self._slot
        slot.timeout = timeout
        slot.submit((None, str(path)))
        while (result := slot.collect(bool(wait([slot.conn], timeout=min(0.5, timeout))))) is None:
            pass
        if result.audio is None:
            raise AudioDecodeError(result.error or "not readable audio")
        return result.audio

    def close(self) -> None:
        if self._slot is not None:
            self._slot.close(kill=True)
            self._slot = None


class _Slot:
    """One worker process and the task it holds."""

    def __init__(self, ctx, with_hash: bool, nice: int = 0, with_prints: bool = False):
        self.ctx, self.with_hash, self.nice, self.with_prints = ctx, with_hash, nice, with_prints
        self.task: tuple[object, str] | None = None
        self.started = 0.0
        self.timeout = DECODE_TIMEOUT
        self._spawn()

    def _spawn(self) -> None:
        self.conn, child = self.ctx.Pipe()
        # started from the pool's thread: PR_SET_PDEATHSIG fires when that thread ends, and it outlives its workers
        self.proc = self.ctx.Process(target=_worker, args=(child, self.with_hash, self.nice, self.with_prints, os.getpid()),
                                     daemon=True)
        try:
            self.proc.start()
        finally:
            child.close()

    def submit(self, task: tuple[object, str]) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def collect(self, readable: bool) -> Decoded | None:
        """The finished result, a failure if the worker died or hung, else None."""
        if readable:
            try:
                result = _receive(self.conn)
                self.task = None
                return result
            except (EOFError, OSError):
                return self._replace(f"decoder crashed ({_exit_reason(self.proc)})")
        if not self.proc.is_alive():
            return self._replace(f"decoder crashed ({_exit_reason(self.proc)})")
        if time.monotonic() - self.started > self.timeout:
            self.proc.kill()
            return self._replace(f"decoding took longer than {self.timeout:g} s")
        return None

    def _replace(self, error: str) -> Decoded:
        key, path = self.task
        self.task = None
        self.proc.join(timeout=5)
        self.conn.close()
        self._spawn()
        return Decoded(key, path, error=error)

    def close(self, kill: bool = False) -> None:
        """End the worker: asked to finish, or killed at once (`kill`: a run stopping early must not wait)."""
        if self.proc.pid is None:  # never started (starting it failed)
            self.conn.close()
            return
        if kill:
            self.proc.kill()
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _exit_reason(proc) -> str:
    proc.join(timeout=1)
    code = proc.exitcode
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _put(out: queue.Queue, item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.5)
            return
        except queue.Full:
            continue

