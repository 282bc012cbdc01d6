"""Stopping a run on Ctrl-C or SIGTERM: the same orderly way out for both.

Python turns SIGINT into KeyboardInterrupt; `sigterm_interrupts` makes SIGTERM
raise `Interrupted`, a KeyboardInterrupt too, so a run cleans up once, in its
`finally` and `except KeyboardInterrupt` blocks, whichever signal came. A run
that stopped re-raises `Interrupted` carrying what it had finished.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `summary` is what it did before (or None), `message` says what was kept."""

    def __init__(self, signum: int = signal.SIGINT, summary: object = None, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum, self.summary, self.message = signum, summary, message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


def signal_of(e: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGTERM when `sigterm_interrupts` raised it, else SIGINT (Ctrl-C)."""
    return e.signum if isinstance(e, Interrupted) else signal.SIGINT


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted in the main thread (elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
