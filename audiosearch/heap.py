"""Process heap tuning: let glibc keep freed memory for the next allocation of the same size.

glibc serves allocations over its mmap threshold (at most 32 MiB, adjusted on the fly) with
fresh mmaps and returns them to the OS when freed, and trims the heap top above 128 KiB. Work
that allocates the same large temporaries again and again then page-faults every one of them
afresh each time, and the kernel zeroes each page first:

- a CPU forward pass of the AST (each activation, each batch): on a 2-core AMX Xeon that was
  ~24 % of a bf16 forward's time at batch 8 and ~6 % at batch 4;
- a print lookup against a large index (the ~3 M chance collisions of a 10 s clip at 10,000 h
  pass through a dozen arrays of 12-24 MB): 61 -> 42 ms at the median and 110 -> 75 ms at p95
  (min of 3 runs) on a 2-core AMD EPYC (BENCHMARKS.md).

Raising both thresholds keeps that memory in the heap, for a few hundred MB more peak RSS.
"""

from __future__ import annotations

import os
import sys

_TUNED = False


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds to 1 GiB, process-wide, once.

    Skipped off Linux, off glibc (musl has no mallopt), and when the MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ environment variables are set (the user's choice wins).
    """
    global _TUNED
    if _TUNED or not sys.platform.startswith("linux"):
        return
    _TUNED = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
    mallopt(m_trim_threshold, ctypes.c_int(1 << 30))
