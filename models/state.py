"""Resume states: what a killed training run needs to continue to the same result an uninterrupted
run reaches (model, optimizer, scheduler, EMA shadow, sampler and dropout RNG, history, best so far),
written after each epoch on a background thread, atomically."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from models import checkpoint


def save_state(path: Path, state: dict) -> None:
    checkpoint.save_tree(state, path)  # atomic, and no pickle: reading it back cannot run code


def snapshot(x):
    """``x`` with every tensor copied: what training will not change under a writer's feet."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(snapshot(v) for v in x)
    return x


class StateWriter:
    """Writes each epoch's resume state on a worker thread while the next epoch trains.

    Written in line, the states took a third of a small fit's time (BENCHMARKS.md, "Why the
    hand-written pieces stay"). The training thread now only
    copies the tensors (the snapshot), and the thread serialises and writes them. One state is in
    flight at a time: ``save`` first waits for the one before, so a kill loses at most the latest
    epoch's state, and the one before it is whole on disk (the write is atomic); resuming from it
    gives the same result. ``close`` waits for the last one; a write's error is raised there or at
    the next ``save``.
    """

    def __init__(self, path: Path):
        self.path, self.thread, self.error = path, None, None

    def save(self, state: dict) -> None:
        self.close()
        copy = snapshot(state)
        self.thread = threading.Thread(target=self._write, args=(copy,), name="bucketchat-resume-state")
        self.thread.start()

    def _write(self, state: dict) -> None:
        try:
            save_state(self.path, state)
        except BaseException as exc:  # raised on the training thread, at the next save or close
            self.error = exc

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def load_state(path: Path) -> dict:
    try:
        return checkpoint.load_tree(path)
    except ValueError as exc:
        raise ValueError(f"resume state {str(path)!r} is unreadable ({exc}); delete it to start over") from exc
