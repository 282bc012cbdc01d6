"""Decoding in worker processes, isolated so that one bad file cannot end a run.

libsndfile and its codecs can crash natively on malformed files. Each worker
decodes one file at a time over its own pipe, so when a worker dies the pool
knows exactly which file killed it, reports that file as failed, and starts a
new worker. A background thread keeps the workers busy and fills a bounded
queue, so decoding runs while the model computes. Workers are forked on Linux
(as torch's DataLoader does): they never touch torch or CUDA, and a script
using the API needs no `if __name__ == "__main__"` guard.

A file travels in parts of PART_SAMPLES, each handed over as soon as it is
decoded, and fingerprinted as it decodes: memory is bounded by the parts in
the queue and in the decoders, whatever the files' length. After a part that
is not its file's last, a worker waits for the pool's word that the part is
queued, so a fast decoder cannot pile parts up in its pipe.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path

import numpy as np
import xxhash

from .audio import SEGMENT_SAMPLES, Audio, open_stream, why_unreadable
from .errors import AudioDecodeError, AudiosearchError

DECODE_TIMEOUT = 600.0  # seconds a decoder may take over one part of a file (a short file: all of it)
PARENT_CHECK_SECONDS = 1.0  # how often an idle worker checks that its parent is alive
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_DONE = object()
_HASH_BLOCK = 1 << 22


@dataclass
class Decoded:
    """The outcome for one file, or for one part of a long file: audio or an error, never both.

    A file comes as parts of about PART_SAMPLES each, in order, the last with `last` set: a
    10-hour recording is never in memory whole. The fingerprint comes with the last part; an
    error may come after parts (a file damaged further in), and ends the file.
    """

    key: object  # the caller's handle for the file
    path: str
    audio: Audio | None = None  # this part's samples
    hash: str | None = None
    error: str | None = None
    prints: bytes | None = None  # the fingerprint (match.fingerprint), when asked for
    file: int = 0  # the file's place among the tasks: the parts of one file share it
    last: bool = True
    expected: float | None = None  # the file's length in seconds as its header says (None: it does not say)


# Samples in a part: 16 segments (2 min 44 s, 10 MiB). Memory then stays bounded by (queued parts
# + decoders) x this, whatever the files' length, and a part is big enough that handing it over
# costs nothing next to decoding it.
PART_SAMPLES = 16 * SEGMENT_SAMPLES


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


class _Part:
    """One part's samples, written block by block: into shared memory (a memfd, handed over as a
    descriptor) or, where there is none, into a list sent through the pipe."""

    def __init__(self, shared: bool):
        self.size = 0
        self.fd: int | None = None
        self._blocks: list[np.ndarray] = []
        if shared:
            try:
                self.fd = os.memfd_create("audiosearch-decoded", os.MFD_CLOEXEC)
            except (AttributeError, OSError):  # not Linux, or out of descriptors: through the pipe
                pass
        self._sink = open(self.fd, "wb", closefd=False) if self.fd is not None else None

    def write(self, block: np.ndarray) -> None:
        if self._sink is not None:
            self._sink.write(np.ascontiguousarray(block).data)
        else:
            self._blocks.append(block)
        self.size += len(block)

    def samples(self) -> np.ndarray:
        """The list form's samples as one array (a shared part is mapped by its receiver instead)."""
        return np.concatenate(self._blocks) if self._blocks else np.empty(0, np.float32)

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            os.close(self.fd)
            self._sink = None


def decode_parts(key: object, path: str, *, with_hash: bool = False, with_prints: bool = False,
                 part_samples: int = PART_SAMPLES, shared: bool = False) -> Iterator[tuple[Decoded, _Part | None]]:
    """Decode a file as parts of at least `part_samples` samples (0: all in one), each with its samples.

    Every expected failure becomes `Decoded.error`, as the last item. The file is fingerprinted
    as it decodes (PrintStream): neither its samples nor its spectrum are ever held whole. The
    caller closes each part it takes.
    """
    part = None
    try:
        digest = content_hash(path) if with_hash else None
        with open_stream(path) as stream:
            printer = _print_stream() if with_prints else None
            audio = Audio(np.empty(0, np.float32), stream.source_rate, stream.channels)
            part = _Part(shared)
            for block in stream:
                part.write(block)
                if printer is not None:
                    printer.feed(block)
                if part_samples and part.size >= part_samples:
                    taken, part = part, None
                    yield Decoded(key, path, audio, digest, last=False, expected=stream.duration), taken
                    part = _Part(shared)
        prints = printer.finish().to_bytes() if printer is not None else None
    except AudiosearchError as e:
        yield Decoded(key, path, error=str(e)), None
    except OSError as e:
        yield Decoded(key, path, error=why_unreadable(path) or f"cannot read file: {e.strerror or e}"), None
    else:
        taken, part = part, None
        yield Decoded(key, path, audio, digest, prints=prints, expected=stream.duration), taken
    finally:
        if part is not None:
            part.close()


def _print_stream():
    from .match.fingerprint import PrintStream  # scipy and the matcher: only for decoders that fingerprint

    return PrintStream()


def _in_memory(result: Decoded, part: _Part | None) -> Decoded:
    if part is not None:
        result.audio = replace(result.audio, samples=part.samples())
    return result


def _worker(conn: Connection, with_hash: bool, nice: int = 0, with_prints: bool = False,
            parent: int = 0, part_samples: int = 0) -> None:
    _die_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        while (task := _from_parent(conn, parent)) is not None:
            _decode_and_send(conn, *task, with_hash, with_prints, part_samples, parent)
    except (EOFError, OSError):
        return


def _from_parent(conn: Connection, parent: int) -> object | None:
    """The parent's next message, or None once this worker is orphaned (re-parented: no one would
    read what it sends; a sibling forked later may hold the parent's end of the pipe open)."""
    while not conn.poll(PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            return None
    return conn.recv()


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


def _decode_and_send(conn: Connection, key: object, path: str, with_hash: bool, with_prints: bool,
                     part_samples: int, parent: int) -> None:
    """Send each part as it is decoded; after one that is not the last, wait until the parent has
    queued it (its "go on"), so that a fast decoder cannot pile parts up in the pipe."""
    parts = decode_parts(key, path, with_hash=with_hash, with_prints=with_prints, part_samples=part_samples,
                         shared=True)
    for result, part in parts:
        try:
            size = 0
            if part is not None and part.fd is None:
                _in_memory(result, part)
            elif part is not None:
                part.flush()
                size = part.size
            conn.send((result, size))
            if size:
                send_handle(conn, part.fd, 0)
        finally:
            if part is not None:
                part.close()
        if not result.last and not _from_parent(conn, parent):
            parts.close()
            return


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
    return Decoded(result.key, result.path, hash=result.hash, error=f"cannot receive decoded audio: {reason}",
                   last=result.last)


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
                 with_prints: bool = False, part_samples: int | None = None):
        self.workers, self.with_hash, self.prefetch, self.nice = workers, with_hash, prefetch, nice
        self.with_prints = with_prints  # also fingerprint each file (ingest)
        self.part_samples = PART_SAMPLES if part_samples is None else part_samples  # 0: each file in one part

    def map(self, tasks: Iterable[tuple[object, str]]) -> Iterator[Decoded]:
        """Yield the parts of each (key, path) task (see Decoded), files in completion order.

        A file's parts come in order, all with the same `file` number; parts of files decoded
        side by side interleave.
        """
        if self.workers <= 0:
            for number, (key, path) in enumerate(tasks):
                for result, part in decode_parts(key, path, with_hash=self.with_hash, with_prints=self.with_prints,
                                                 part_samples=self.part_samples):
                    result.file = number
                    yield _in_memory(result, part)
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
                slots.append(_Slot(ctx, self.with_hash, self.nice, self.with_prints, self.part_samples))
            self._loop(slots, tasks, out, stop)
            _put(out, _DONE, stop)
        except BaseException as e:  # hand any failure to the consuming thread
            _put(out, e, stop)
        finally:
            for slot in slots:  # stopped early (an interrupt, the consumer gone): what they decode is not wanted
                slot.close(kill=stop.is_set())

    def _loop(self, slots: list[_Slot], tasks: Iterator, out: queue.Queue, stop: threading.Event) -> None:
        exhausted = False
        number = 0
        while not stop.is_set():
            for slot in slots:
                if slot.task is None and not exhausted:
                    task = next(tasks, None)
                    exhausted = task is None
                    if task is not None:
                        slot.submit(task, number)
                        number += 1
            busy = [s for s in slots if s.task is not None]
            if not busy:
                return
            ready = wait([s.conn for s in busy], timeout=0.5)
            for slot in busy:
                result = slot.collect(slot.conn in ready)
                if result is not None:
                    _put(out, result, stop)
                    if not result.last:  # queued: its decoder may go on with the next part
                        slot.resume()


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

    def __init__(self, ctx, with_hash: bool, nice: int = 0, with_prints: bool = False, part_samples: int = 0):
        self.ctx, self.with_hash, self.nice, self.with_prints = ctx, with_hash, nice, with_prints
        self.part_samples = PART_SAMPLES if part_samples is None else part_samples  # 0: each file in one part
        self.task: tuple[object, str] | None = None
        self.number = 0
        self.started = 0.0
        self.timeout = DECODE_TIMEOUT
        self._spawn()

    def _spawn(self) -> None:
        self.conn, child = self.ctx.Pipe()
        # started from the pool's thread: PR_SET_PDEATHSIG fires when that thread ends, and it outlives its workers
        self.proc = self.ctx.Process(target=_worker, args=(child, self.with_hash, self.nice, self.with_prints,
                                                           os.getpid(), self.part_samples), daemon=True)
        try:
            self.proc.start()
        finally:
            child.close()

    def submit(self, task: tuple[object, str], number: int = 0) -> None:
        self.task, self.number, self.started = task, number, time.monotonic()
        self.conn.send(task)

    def resume(self) -> None:
        """Let the worker decode the next part of its file (the clock restarts: the timeout is per part)."""
        self.started = time.monotonic()
        try:
            self.conn.send(True)
        except OSError:  # it died meanwhile: collect() finds out
            pass

    def collect(self, readable: bool) -> Decoded | None:
        """The next part (or the whole) of the file, a failure if the worker died or hung, else None."""
        if readable:
            try:
                result = _receive(self.conn)
            except (EOFError, OSError):
                return self._replace(f"decoder crashed ({_exit_reason(self.proc)})")
            if result.error and not result.last:  # a part lost mid-file: the rest of the file is worth nothing
                self.proc.kill()
                return self._replace(result.error)
            result.file = self.number
            if result.last:
                self.task = None
            return result
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
        return Decoded(key, path, error=error, file=self.number)

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

