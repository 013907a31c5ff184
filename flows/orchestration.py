"""The Prefect API a ``bucketchat`` command talks to, and the flow runs whose process died.

With ``PREFECT_API_URL`` set (a real server: ``make prefect-up``, a cluster), commands use it and
nothing here starts. Without one, Prefect would start a temporary API server of its own, which a
``kill -9`` of the command leaves running (~225 MB each) with its flow runs shown as Running
forever. So the command starts that server itself, as a child that the kernel stops when the
command dies however it dies (``PR_SET_PDEATHSIG`` on Linux), in its own session so that a Ctrl-C
in the terminal reaches the command first and the command can still record how its runs ended.

Every flow run a command makes is tagged with the process that made it (``runner:HOST:PID:START``).
The next command marks the runs of a process that no longer exists as Crashed, so the UI never
shows a dead run as Running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TAG = "bucketchat"
RUNNER_PREFIX = "runner:"
_PR_SET_PDEATHSIG = 1


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None when it is not running:
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def runner_tag(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{RUNNER_PREFIX}{socket.gethostname()}:{pid}:{_process_start(pid) or 0}"


def runner_alive(tag: str) -> bool:
    """Whether the process a ``runner:`` tag names still runs. Another host's runs count as alive:
    only that host can tell."""
    host, pid, start = tag[len(RUNNER_PREFIX) :].rsplit(":", 2)
    if host != socket.gethostname():
        return True
    return _process_start(int(pid)) == start


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class LocalApi:
    """A Prefect API server for this process only (``start`` early, ``wait`` before the first flow)."""

    def __init__(self, log_file: Path):
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        parent = os.getpid()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None,
            )
        os.environ["PREFECT_API_URL"] = self.url  # before prefect is imported: it reads settings once
        atexit.register(self.stop)

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the server answers; a server that died says so with its log's path."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local Prefect API server exited with status {self.proc.returncode}; its log is {self.log_file}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the local Prefect API server did not answer within {timeout:.0f} s; its log is {self.log_file}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # Deliver the run logs Prefect still holds while the server can take them: at exit
            # logging.shutdown runs after this (registered earlier) and would wait 5 s on a dead one.
            if "prefect.logging.handlers" in sys.modules:
                from prefect.logging.handlers import APILogWorker

                with contextlib.suppress(Exception):
                    APILogWorker.drain_all(timeout=3)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def crash_dead_runs(own: bool = False, timeout: float | None = None) -> list[str]:
    """Mark the Running/Pending flow runs (and their task runs) of bucketchat processes that no
    longer exist as Crashed; returns the ids of the flow runs marked.

    ``own``: this process's runs instead, as it stops on a signal: Prefect records the runs it
    unwinds, but one whose unwinding the grace period cuts short would stay Running. ``timeout``
    bounds the whole call (seconds); what it leaves unmarked, the next command marks.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    live = FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
    mine = runner_tag()
    deadline = time.monotonic() + timeout if timeout else float("inf")
    marked = []
    with get_client(sync_client=True, httpx_settings={"timeout": timeout} if timeout else None) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=live), tags=FlowRunFilterTags(all_=[TAG])))
        for run in runs:
            if time.monotonic() > deadline:
                break
            runner = next((t for t in run.tags if t.startswith(RUNNER_PREFIX)), None)
            if runner is None or (runner != mine if own else runner_alive(runner)):
                continue
            if own:
                message = "Execution was aborted by a signal; the command stopped before the run could record it."
            else:
                message = f"the bucketchat process that ran it ({runner[len(RUNNER_PREFIX) :]}) ended without reporting: killed, or the machine stopped"
            for task_run in client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))):
                if task_run.state and task_run.state.type in (StateType.RUNNING, StateType.PENDING):
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append(str(run.id))
    return marked


_STARTED = []  # the LocalApi this command started, if any (chat, serve, eval, registry never start one)


def api_configured() -> bool:
    """A Prefect API to use already: PREFECT_API_URL, or (prefect already imported, e.g. under a
    test harness) Prefect's own settings."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return False


def start_api() -> None:
    """After a command's inputs are checked: start the local Prefect API unless one is configured.
    It boots while the command imports torch, Prefect and LanceDB; ``orchestrated`` waits for it."""
    if _STARTED or api_configured():
        return
    from tasks.settings import state_home

    api = LocalApi(state_home() / "logs" / "prefect-api.log")
    api.start()
    _STARTED.append(api)


@contextlib.contextmanager
def orchestrated():
    """Around a flow call: the API is up, runs of dead processes are marked crashed, and this
    process's runs carry its runner tag."""
    import prefect
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    for api in _STARTED:
        api.wait()
    crash_dead_runs()
    # Heartbeats tell a shared server that a run's process is alive. On the command's own API the
    # runner tag does that job (crash_dead_runs), and Prefect's heartbeat thread costs every flow run
    # up to a second at its end (it sleeps in one-second steps before it sees the stop): five flow
    # runs per pipeline. A server the user configured keeps them.
    heartbeats = {} if not _STARTED else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with temporary_settings(updates=heartbeats), prefect.tags(TAG, runner_tag()):
        yield
