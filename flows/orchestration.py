"""The Prefect API a ``bucketchat`` command talks to, and the flow runs whose process died.

With ``PREFECT_API_URL`` set (a real server: ``make prefect-up``, a cluster), commands use it and
nothing here starts. Without one, a command joins the local API its Prefect home shares between
commands (``flows/local_api.py``), starting it if none runs.

Every flow run a command makes is tagged with the process that made it (``runner:HOST:PID:START``).
The next command marks the runs of a process that no longer exists as Crashed, so the UI never
shows a dead run as Running.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

from flows.local_api import SharedApi
from models.processes import process_start

TAG = "bucketchat"
RUNNER_PREFIX = "runner:"


def runner_tag(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{RUNNER_PREFIX}{socket.gethostname()}:{pid}:{process_start(pid) or 0}"


def runner_alive(tag: str) -> bool:
    """Whether the process a ``runner:`` tag names still runs. Another host's runs count as alive:
    only that host can tell."""
    host, pid, start = tag[len(RUNNER_PREFIX) :].rsplit(":", 2)
    if host != socket.gethostname():
        return True
    return process_start(int(pid)) == start


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


_STARTED = []  # the SharedApi this command joined, if any (chat, serve, eval, registry never join one)


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
    """After a command's inputs are checked: join the shared local Prefect API (starting it if none
    runs) unless one is configured. A new one boots while the command imports torch, Prefect and
    LanceDB; ``orchestrated`` waits for it."""
    if _STARTED or api_configured():
        return
    from tasks.settings import state_home

    home = Path(os.environ.get("PREFECT_HOME") or state_home() / "prefect").expanduser()
    api = SharedApi(home / "api", state_home() / "logs" / "prefect-api.log")
    api.join()
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
    # Heartbeats tell a server that a run's process is alive. On the local API the runner tag does
    # that job (crash_dead_runs), and Prefect's heartbeat thread costs every flow run
    # up to a second at its end (it sleeps in one-second steps before it sees the stop): five flow
    # runs per pipeline. A server the user configured keeps them.
    heartbeats = {} if not _STARTED else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with temporary_settings(updates=heartbeats), prefect.tags(TAG, runner_tag()):
        yield
