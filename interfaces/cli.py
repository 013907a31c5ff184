"""The ``bucketchat`` command: parse, apply the environment, run one command, turn what went wrong
into one line and an exit status.

Flags are snake_case as in the seed; the kebab-case spelling works too (``--creative-prob``).
Heavy imports happen inside each command, so ``--help`` is instant and ``chat`` never loads Prefect.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback

from interfaces import console
from interfaces.chat import cmd_chat, cmd_eval, cmd_serve
from interfaces.commands import cmd_build_super, cmd_db, cmd_expand, cmd_finetune, cmd_pipeline, cmd_registry, cmd_retrain, cmd_size_sweep
from interfaces.parser import build_parser
from interfaces.report import cmd_report
from interfaces.review import cmd_review
from interfaces.signals import COMMAND, on_signal, signal_of, stop_now, watch_signals
from tasks.settings import apply_environment

COMMANDS = {
    "expand": cmd_expand,
    "build-super": cmd_build_super,
    "db": cmd_db,
    "finetune": cmd_finetune,
    "size-sweep": cmd_size_sweep,
    "registry": cmd_registry,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "serve": cmd_serve,
    "report": cmd_report,
    "review": cmd_review,
    "pipeline": cmd_pipeline,
    "retrain": cmd_retrain,
}


# The commands that run flows write the libraries' logs to a log file (interfaces/console.py).
FLOW_COMMANDS = {"expand", "build-super", "db", "finetune", "size-sweep", "pipeline", "retrain"}


def _quiet(command: str, verbose: bool) -> None:
    """Without --verbose, the commands that keep no log file keep library notices (MLflow's store
    set-up) off the terminal. Must run before mlflow is imported (it reads its settings once)."""
    if not verbose and command not in FLOW_COMMANDS:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 failed, 2 bad input or arguments (one line saying
    which and the fix), 128 + N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM)."""
    console.started()
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _quiet(args.command, verbose)
    apply_environment()  # before anything imports prefect: it reads its settings once
    name = COMMAND[0] = f"bucketchat {args.command}"
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        watch_signals()
    from conversations.records import RecordError

    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RecordError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        signum = signal_of(exc)
        if signum is not None:
            stop_now(name, signum)
        if isinstance(exc, SystemExit):
            raise
        if verbose:
            traceback.print_exc()
        print(f"{name}: failed: {type(exc).__name__}: {exc} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():  # main() called in-process (tests) leaves them as they were
            signal.signal(sig, handler)
        if handlers:
            signal.set_wakeup_fd(-1)
    return 0


def entry() -> None:
    """The ``bucketchat`` command: ``main``, the exit handlers (Prefect's last logs and events, the
    local API server's stop), then the end of the process without Python's module-by-module
    teardown, which took ~2 s of every command once torch, LanceDB and Prefect were loaded
    (tests/bench/startup.py). Everything the command writes is closed or flushed by then."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    entry()
