"""What a command shows on the terminal, and where everything else goes.

A data or training command owns the terminal: one progress bar per long stage and a short summary.
Whatever the libraries under it write to stderr (Prefect's run logs, MLflow's notices, LanceDB's Rust
logger, warnings) goes to the command's log file, whose path the summary prints; ``--verbose`` streams
it all to the terminal instead. The redirection is of file descriptor 2, so what C extensions and
background threads write lands in the file too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from models import progress
from tasks.settings import state_home

KEEP_LOGS = 50  # the newest logs are kept; older ones are removed as new ones are made
_TERMINAL: list[TextIO | None] = [None]
_STARTED = [time.monotonic()]


def started() -> None:
    """Mark the command's start: the summary's time counts from here."""
    _STARTED[0] = time.monotonic()


def terminal() -> TextIO:
    """The terminal's stderr, also while fd 2 goes to the log file: for what the user must see."""
    return _TERMINAL[0] or sys.stderr


def new_log(command: str) -> Path:
    folder = state_home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("bucketchat-*.log"), key=lambda p: p.stat().st_mtime)[: -(KEEP_LOGS - 1) or None]:
        old.unlink(missing_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return folder / f"bucketchat-{command}-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def captured(command: str, verbose: bool) -> Iterator[Path | None]:
    """The body's stderr goes to a new log file (its path is yielded), progress bars to the terminal;
    with ``verbose`` both go to the terminal and no file is made. Restored on the way out, however
    the body ends, so an error message after it reaches the terminal."""
    if verbose:
        progress.show_on(sys.stderr)
        try:
            yield None
        finally:
            progress.show_on(None)
        return
    path = new_log(command)
    sys.stderr.flush()
    saved = os.dup(2)
    term = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _TERMINAL[0] = term
    progress.show_on(term)
    try:
        yield path
    finally:
        progress.show_on(None)
        _TERMINAL[0] = None
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        term.close()


def footer(log: Path | None) -> str:
    """The summary's last line: how long the command took and where its log is."""
    took = f"done in {time.monotonic() - _STARTED[0]:.1f} s"
    return f"{took}; log: {log}" if log else took
