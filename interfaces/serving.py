"""Running ``bucketchat serve``: the app (interfaces/server.py) on N processes sharing one socket.

One Python process answers on about one core, whatever its threads: the encoder and the head release
the GIL, but the HTTP handling and the answer's Python do not. So the server runs N processes: the
command's own process loads the model, binds the socket and serves at once (so a bad model fails
before anything starts, and the server is ready as soon as one process is); it then starts N - 1
helpers (``python -m interfaces.serving``) that load the same files, inherit the socket and accept
from it too. The table's search index is memory-mapped, so the processes share its pages.

A helper ends with the command: it asks the kernel for SIGTERM when its parent dies (Linux
``PR_SET_PDEATHSIG``), and the command stops its helpers when it is stopped. A helper that dies
while serving is started again; one that cannot start is reported and left out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

RESTART_AFTER_S = 5.0  # a helper that dies sooner than this after starting is not restarted

_helpers: list[subprocess.Popen] = []
_stopping = threading.Event()


def serve(engine, cfg) -> None:
    """Serve ``engine`` in the foreground until stopped: this process, and ``cfg.workers - 1``
    helper processes on the same socket."""
    from interfaces.server import create_app

    sock = bind(cfg.host, cfg.port)
    print(
        f"bucketchat serving {cfg.model_name} on http://{cfg.host}:{cfg.port}  (chat page at /, OpenAI API at /v1{', API key required' if cfg.api_key else ''}; {cfg.workers} process{'es' if cfg.workers > 1 else ''})",
        flush=True,
    )
    if cfg.workers > 1:
        start_helpers(sock, engine, cfg, cfg.workers - 1)
    try:
        _run(create_app(engine, cfg), sock)
    finally:
        stop_helpers()


def _run(app, sock: socket.socket) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=1)).run(sockets=[sock])


def auto_workers() -> int:
    """One process per core the command may use, at most 4 (each holds ~300 MB of its own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every process accepts from; a port in use is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and
    # without it Nagle's algorithm held small responses back (148 against 274 req/s, one process).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"--host {host} --port {port} cannot be used ({exc.strerror}); pick another --port or stop what holds it"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_helpers(sock: socket.socket, engine, cfg, count: int) -> None:
    """Start ``count`` helper processes serving ``engine``'s model on ``sock``, and a thread that
    starts again any that dies while serving."""
    spec = json.dumps(
        {
            "fd": sock.fileno(),
            "weights": engine.files[0],
            "meta": engine.files[1],
            "options": asdict(engine.opts),
            "config": asdict(cfg),
            "log": engine.turn_log.spec if engine.turn_log is not None else None,
        }
    )
    for _ in range(count):
        _helpers.append(_spawn(sock, spec))
    threading.Thread(target=_watch, args=(sock, spec), name="bucketchat-workers", daemon=True).start()


def _spawn(sock: socket.socket, spec: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "interfaces.serving", spec], pass_fds=[sock.fileno()])
    proc.started = time.monotonic()  # type: ignore[attr-defined]
    return proc


def _watch(sock: socket.socket, spec: str) -> None:
    while not _stopping.wait(0.5):
        for i, proc in enumerate(list(_helpers)):
            code = proc.poll()
            if code is None or _stopping.is_set():
                continue
            if time.monotonic() - proc.started < RESTART_AFTER_S:  # type: ignore[attr-defined]
                print(
                    f"serve: worker process {proc.pid} could not start (exit {code}); serving with one fewer", file=sys.stderr, flush=True
                )
                _helpers.remove(proc)
            else:
                print(f"serve: worker process {proc.pid} ended (exit {code}); starting another", file=sys.stderr, flush=True)
                _helpers[i] = _spawn(sock, spec)


def stop_helpers(timeout: float = 1.5) -> None:
    """SIGTERM every helper (each finishes its answers in flight), then SIGKILL what is left."""
    _stopping.set()
    for proc in _helpers:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in _helpers:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request took effect
        sys.exit(0)


def main(spec: str) -> None:
    """A helper: load the model the command loaded, then serve on the inherited socket."""
    _die_with_parent()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again: end quietly
    # there (Ctrl-C reaches every process of the terminal's group, helpers included).
    log = []

    def stop(signum, frame):
        for each in log:
            each.close()  # its last turns, then sealed
        os._exit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    from interfaces.server import ServerConfig, create_app
    from retrieval.answer import ChatEngine, ChatOptions
    from retrieval.turn_log import TurnLog

    s = json.loads(spec)
    engine = ChatEngine(s["weights"], s["meta"], ChatOptions(**s["options"]))
    if s.get("log"):
        engine.turn_log = TurnLog(**s["log"])
        log.append(engine.turn_log)
    _run(create_app(engine, ServerConfig(**s["config"])), socket.socket(fileno=s["fd"]))


if __name__ == "__main__":
    main(sys.argv[1])
