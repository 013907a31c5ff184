"""Bounded memory for jobs that stream a table a batch at a time (db build, the search index).

Two things make such a job's resident memory grow with the table even when no batch outlives its
turn: batches sized in rows (a batch of 16k rows is 25 MB of 384-d vectors but 268 MB of 4,096-d
ones), and allocators keeping what was freed (Arrow's mimalloc pool and glibc's heap held ~150 MB
after a pass over 80k rows, measured with /proc/self/status). ``batch_rows`` sizes batches in
bytes; ``release`` hands freed memory back after each batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util

BATCH_BYTES = 32 << 20  # vectors per batch: float64 sums of them make 2x this
MIN_ROWS, MAX_ROWS = 1_024, 16_384

_libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def batch_rows(dim: int) -> int:
    """Rows per batch for vectors of ``dim`` float32s."""
    return max(MIN_ROWS, min(MAX_ROWS, BATCH_BYTES // (4 * max(dim, 1))))


def release() -> None:
    """Give memory freed since the last call back to the system: Arrow's pool, then glibc's heap."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
