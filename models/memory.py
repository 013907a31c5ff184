"""Bounded memory for jobs that stream a table a batch at a time (db build, the search index,
training's vectors and n-gram features).

Two things make such a job's resident memory grow with the table even when no batch outlives its
turn: batches sized in rows (a batch of 16k rows is 25 MB of 384-d vectors but 268 MB of 4,096-d
ones), and allocators keeping what was freed (Arrow's mimalloc pool and glibc's heap held ~150 MB
after a pass over 80k rows, measured with /proc/self/status). ``batch_rows`` sizes batches in
bytes; ``release`` hands freed memory back after each batch. What must outlive the pass (a table's
vectors, every row's n-gram features) goes to scratch files mapped back in (``scratch_array``,
``Appender``): their pages are the kernel's to write back and drop, not the process's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import tempfile
from pathlib import Path

import numpy as np

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


def _scratch_file(folder: Path):
    """A new file in ``folder`` without a name (unlinked as made): gone when its last handle or map closes."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=folder, prefix="bucketchat-scratch-")


def scratch_array(folder: Path | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A writable zeroed array of ``shape``; with ``folder``, backed by an unlinked file there.

    The map outlives the file's name: its pages are written back to the open file, and the space is
    freed when the last map closes, so nothing is left behind even if the process is killed."""
    if folder is None or not int(np.prod(shape)):
        return np.zeros(shape, dtype)
    with _scratch_file(folder) as f:
        f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return np.memmap(f, dtype=dtype, mode="r+", shape=shape)


class Appender:
    """A 1-d array of unknown length built a piece at a time: in memory, or with ``folder`` in an
    unlinked scratch file there, mapped back by ``array()`` (a list joined at the end would hold the
    pieces and the whole at once)."""

    def __init__(self, folder: Path | None, dtype):
        self.dtype, self.length = np.dtype(dtype), 0
        self._pieces: list[np.ndarray] = []
        self._file = None
        if folder is not None:
            self._file = _scratch_file(folder)

    def append(self, piece: np.ndarray) -> None:
        piece = np.ascontiguousarray(piece, dtype=self.dtype)
        self.length += len(piece)
        if self._file is None:
            self._pieces.append(piece)
        else:
            self._file.write(piece.tobytes())

    def array(self) -> np.ndarray:
        """Everything appended, as one array (read-write); the appender is spent."""
        if self._file is None:
            out = np.concatenate(self._pieces) if self._pieces else np.zeros(0, self.dtype)
            self._pieces = []
            return out
        with self._file as f:
            self._file = None
            if not self.length:
                return np.zeros(0, self.dtype)
            f.flush()
            return np.memmap(f, dtype=self.dtype, mode="r+", shape=(self.length,))
