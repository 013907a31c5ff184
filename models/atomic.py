"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Shared by checkpoints (models/), datasets (tasks/) and the embedding cache (retrieval/).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path


def failpoint(name: str) -> None:
    """Die here exactly as ``kill -9`` would when ``BUCKETCHAT_FAILPOINT`` names this point.

    The fault tests use it to crash a real process at the worst moments (rows written but not
    indexed, a checkpoint about to replace the old one, a version registered but not promoted) and
    then check that what was there before is intact. Unset, it costs one dictionary lookup.
    """
    if os.environ.get("BUCKETCHAT_FAILPOINT") == name:
        once = os.environ.get("BUCKETCHAT_FAILPOINT_ONCE")  # a file: only the first process to get here dies
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over ``path``.

    Example::

        with atomic_path("out.parquet") as tmp:
            table.to_parquet(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # fsync before rename, or a power cut can leave a renamed but empty file.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        failpoint(f"replace:{target.name}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like ``atomic_path`` for a folder: fill the yielded folder; it then replaces ``path`` by rename
    (the old folder is moved aside first and removed after, so a crash leaves one complete folder)."""
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
