"""Resume states: what a killed training run needs to continue to the same result an uninterrupted
run reaches (model, optimizer, scheduler, EMA shadow, sampler and dropout RNG, history, best so far),
written after the first epoch and then every few seconds of training, atomically."""

from __future__ import annotations

import threading
import time
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


STATE_EVERY_S = 10.0  # see StateWriter


class StateWriter:
    """Writes the resume state of a run in training: after the first epoch, then after the first
    epoch that ends ``every_s`` seconds or more after the last write began.

    A kill loses at most the epochs of the last ``every_s`` seconds, and the resumed run still ends
    where an uninterrupted one would. Written after every epoch, the states cost a quarter of the
    sample's training time: short epochs, each with a serialisation and an fsync. The first is
    written in line, so a state exists as soon as one epoch is done; the later ones on a worker
    thread while the next epochs train: the training thread only copies the tensors (the snapshot).
    One state is in flight at a time: ``save`` first waits for the one before, and the one on disk
    is always whole (the write is atomic). ``close`` waits for the last one; a write's error is
    raised there or at the next ``save``.
    """

    def __init__(self, path: Path, every_s: float = STATE_EVERY_S):
        self.path, self.every_s, self.thread, self.error, self.last = path, every_s, None, None, None

    def due(self) -> bool:
        return self.last is None or time.monotonic() - self.last >= self.every_s

    def save(self, state: dict) -> None:
        self.close()
        first, self.last = self.last is None, time.monotonic()
        copy = snapshot(state)
        if first:
            save_state(self.path, copy)
            return
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
