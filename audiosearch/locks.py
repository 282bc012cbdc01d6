"""Exclusive file locks that a forked child never keeps.

A `flock` belongs to the open file description, which `fork` shares: a child
holding a copy of the descriptor keeps the lock for as long as it lives,
after its parent is gone (a decoder orphaned by `kill -9` of ingest held the
index's write lock so). Every lock taken here is recorded, and its descriptor
closed in any child right after `fork` (`os.register_at_fork`), before the
child runs a line of its own. Closing, never `LOCK_UN`: unlocking a shared
description would release the parent's lock too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held: set[int] = set()  # descriptors of locks held by this process


def _close_in_child() -> None:
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FileLock:
    """An exclusive, non-blocking lock on `path` (created if missing); released by the kernel if the holder dies."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock; False if another holder has it. Raises OSError if the file cannot be opened."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _held.add(fd)
        os.ftruncate(fd, 0)  # the holder's pid, for the message another writer gets
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            os.ftruncate(self._fd, 0)  # no stale pid for the next refusal to name
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_locked(path: str | Path) -> bool:
    """Whether someone holds the lock on `path` (a missing file is unlocked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
