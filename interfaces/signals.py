"""Ctrl-C and SIGTERM: every command stops within ``STOP_GRACE_S``, says once why, leaves no run
marked Running and no half-written file, and exits 128 + the signal's number."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# After Ctrl-C or SIGTERM a command gets this long to record how its runs ended, then exits anyway.
STOP_GRACE_S = 1.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised in the main thread (a KeyboardInterrupt, so Prefect records the
    run as crashed by an interrupt and libraries unwind as they do for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


COMMAND = ["bucketchat"]  # "bucketchat COMMAND" once main has parsed the arguments


_stopping: list[int] = []  # the signal, once a stop has begun


_said = threading.Lock()


_closers: list = []  # what must be written before a stop: the conversation log's last turns


def at_stop(fn) -> None:
    """Call ``fn`` when a signal stops the command, before it exits (``stop_now``)."""
    _closers.append(fn)


def stop_now(name: str, signum: int) -> None:
    """Say once why the command stopped, and exit without waiting for anything else: what a run
    must record (its crashed state) was recorded while the exception unwound, every file is written
    atomically, and the local Prefect server goes with this process (flows/orchestration.py).
    A run whose unwinding the grace period cut short is marked Crashed here, not left Running."""
    if not _said.acquire(blocking=False):
        time.sleep(1.0)  # the other thread is saying it, and ends the process when it has
        os._exit(128 + signum)
    for fn in _closers:
        try:
            fn()
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
    if "prefect" in sys.modules:
        try:
            from flows.orchestration import crash_dead_runs

            crash_dead_runs(own=True, timeout=0.4)
        except Exception:  # noqa: BLE001 - stopping anyway; the next command marks them
            pass
    from interfaces.console import terminal

    terminal().write(
        f"\n{name}: stopped by {signal.Signals(signum).name}; files it writes are replaced whole, so nothing half-written was kept (run it again to continue)\n"
    )
    terminal().flush()
    sys.stdout.flush()
    os._exit(128 + signum)


def begin_stop(name: str, signum: int) -> None:
    """Start the grace period once: whatever is still unwinding when it ends is cut short."""
    if not _stopping:
        _stopping.append(signum)
        timer = threading.Timer(STOP_GRACE_S, stop_now, args=(name, signum))
        timer.daemon = True
        timer.start()


def watch_signals() -> None:
    """Start the grace period on every Ctrl-C or SIGTERM, also the ones a library's own handler
    takes (Prefect raises its own exception for SIGTERM inside a flow run): the kernel-level
    handler writes each signal's number to this pipe whichever Python handler then runs."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(read, 1):
            if data[0] in (signal.SIGINT, signal.SIGTERM):
                begin_stop(COMMAND[0], data[0])

    threading.Thread(target=watch, name="bucketchat-signals", daemon=True).start()


def on_signal(signum: int, frame) -> None:
    name = COMMAND[0]
    if _stopping:  # a second Ctrl-C: now
        stop_now(name, signum)
    begin_stop(name, signum)
    raise Interrupted(signum)


def signal_of(exc: BaseException | None) -> int | None:
    """The signal behind ``exc``, also when a library turned it into another exception on the way
    (transformers' lazy imports re-raise anything as ModuleNotFoundError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if type(exc).__name__ == "TerminationSignal":  # Prefect's own SIGTERM handler, inside a flow run
            return getattr(exc, "signal", signal.SIGTERM)
        exc = exc.__cause__ or exc.__context__
    return _stopping[0] if _stopping else None
