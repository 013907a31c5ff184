"""One local Prefect API shared by the commands of a Prefect home, started by the first that needs
it and stopped when none has needed it for a while.

Without ``PREFECT_API_URL``, Prefect would boot an API server inside every command: ~4 s of CPU on
a 2-core machine, most of a short pipeline's overhead. Here the first command starts one in the
background, in its own session (a Ctrl-C in the terminal does not reach it), and the next commands
find it through ``api.json`` in ``PREFECT_HOME/api/``. Each command holds a lease there (a file
named after its process) while it runs; the server stops itself once no lease names a live process
and ``BUCKETCHAT_PREFECT_IDLE_S`` seconds (default 300) have passed, so a killed command holds it
no longer than one that ended. A lock file orders the two races: a command joining a server that
is deciding to stop, and two commands starting one at once.

    python -m flows.local_api FOLDER IDLE_S   # the server side; a command starts it, not a person
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

from models.processes import process_start

IDLE_ENV = "BUCKETCHAT_PREFECT_IDLE_S"
DEFAULT_IDLE_S = 300.0
_CHECK_EVERY_S = 0.5


def _alive(pid: int, start: str) -> bool:
    return process_start(pid) == start


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV)
    try:
        return float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise SystemExit(f"{IDLE_ENV}={raw!r} is not a number of seconds; unset it for {DEFAULT_IDLE_S:.0f}") from None


@contextlib.contextmanager
def _locked(folder: Path):
    with open(folder / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "api.json").read_text())
    except (OSError, ValueError):
        return None


def _live_leases(folder: Path) -> int:
    """The leases whose process still runs; the others (a killed command's) are removed."""
    live = 0
    for lease in (folder / "leases").glob("*"):
        pid, _, start = lease.name.partition("-")
        if pid.isdigit() and _alive(int(pid), start):
            live += 1
        else:
            lease.unlink(missing_ok=True)
    return live


class SharedApi:
    """This command's use of the shared API: ``join()`` finds or starts it and sets
    ``PREFECT_API_URL`` (before Prefect is imported: it reads its settings once); ``wait()`` blocks
    until it answers. The lease ends with the process, however it ends."""

    def __init__(self, folder: Path, log_file: Path):
        self.folder, self.log_file = folder, log_file
        self.url: str | None = None
        self.pid: int | None = None
        self.started = False  # whether this command started the server
        self.lease = folder / "leases" / f"{os.getpid()}-{process_start(os.getpid()) or 0}"

    def join(self) -> None:
        (self.folder / "leases").mkdir(parents=True, exist_ok=True)
        prefect_version = version("prefect")
        with _locked(self.folder):
            self.lease.touch()  # under the lock: a server deciding to stop sees it
            state = _read_state(self.folder)
            if state and state.get("prefect") == prefect_version and _alive(state["pid"], state["start"]):
                self.url, self.pid = state["url"], state["pid"]
            else:
                self._start(prefect_version)
        atexit.register(self.lease.unlink, missing_ok=True)
        os.environ["PREFECT_API_URL"] = self.url

    def _start(self, prefect_version: str) -> None:
        # The socket is bound and listening here and handed over: no port can be taken in between,
        # and a command's first requests queue in its backlog while the server boots.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        with open(self.log_file, "ab") as log, sock:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.local_api", str(self.folder), str(idle_seconds()), str(sock.fileno())],
                env=env,
                cwd=Path(__file__).resolve().parents[1],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=[sock.fileno()],
            )
        self.url, self.pid, self.started = f"http://127.0.0.1:{port}/api", proc.pid, True
        self._proc = proc  # reaped by Popen's own bookkeeping if it ends while this command runs
        state = {"url": self.url, "pid": proc.pid, "start": process_start(proc.pid) or "0", "prefect": prefect_version}
        tmp = self.folder / f".api.json.{os.getpid()}"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "api.json")

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the server answers; a server that died says so with its log's path."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if process_start(self.pid) is None:
                    raise RuntimeError(f"the local Prefect API server exited; its log is {self.log_file}") from None
                time.sleep(0.05)
        raise RuntimeError(f"the local Prefect API server did not answer within {timeout:.0f} s; its log is {self.log_file}")


def _stop_when_idle(server, folder: Path, idle_s: float) -> None:
    """The server's watch: stop once no live lease has been seen for ``idle_s`` seconds, or at once
    when its folder is gone (the Prefect home was deleted: no command can find this server again).
    Any error here stops the server too: better a new one next time than one that never ends."""
    try:
        _watch(server, folder, idle_s)
    finally:
        server.should_exit = True


def _watch(server, folder: Path, idle_s: float) -> None:
    me = str(os.getpid())
    idle_since = None
    while not server.should_exit:
        time.sleep(_CHECK_EVERY_S)
        if not folder.is_dir():
            return
        if _live_leases(folder):
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since < idle_s:
            continue
        with _locked(folder):
            if _live_leases(folder):  # a command joined since
                idle_since = None
                continue
            state = _read_state(folder)
            if state and str(state.get("pid")) == me:
                (folder / "api.json").unlink(missing_ok=True)
        return


def serve(folder: Path, idle_s: float, fd: int) -> None:
    import uvicorn

    config = uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, fd=fd, log_level="error", lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    threading.Thread(target=_stop_when_idle, args=(server, folder, idle_s), daemon=True).start()
    server.run()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
