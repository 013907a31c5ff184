"""The local Prefect API that commands share (flows/local_api.py), with real processes: commands in a
row use one server, two starting at once still make one, and it stops itself once no live
process holds a lease, whether its last user ended or was killed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.reliability import running
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

JOIN = """
import sys, time
from pathlib import Path
from flows.local_api import SharedApi
api = SharedApi(Path(sys.argv[1]), Path(sys.argv[1]) / "api.log")
api.join()
api.wait()
print(api.url, api.pid, api.started, flush=True)
time.sleep(float(sys.argv[2]))
"""


def _env(home: Path, idle: float) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BUCKETCHAT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "BUCKETCHAT_PREFECT_IDLE_S": str(idle),
    }
    env.pop("PREFECT_API_URL", None)
    return env


def _state(home: Path) -> dict | None:
    path = home / "prefect" / "api" / "api.json"
    return json.loads(path.read_text()) if path.exists() else None


def _wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_commands_in_a_row_share_one_api_which_stops_when_idle(tmp_path, tiny_records):
    env = _env(tmp_path, idle=3)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", tiny_records)
    pids = []
    for n in range(2):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "interfaces.cli",
                "expand",
                "--input",
                str(tiny),
                "--output",
                str(tmp_path / f"g{n}.jsonl"),
                "--target",
                "30",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        state = _state(tmp_path)
        assert state and running(state["pid"])
        pids.append(state["pid"])
    assert pids[0] == pids[1], "the second command started a server of its own"
    assert _wait_gone(pids[0], within=15), "the idle API did not stop"
    assert _state(tmp_path) is None  # it took its address with it: the next command starts a new one
    assert list((tmp_path / "prefect" / "api" / "leases").iterdir()) == []


def test_two_commands_starting_at_once_make_one_server_and_a_live_lease_keeps_it(tmp_path):
    folder = tmp_path / "prefect" / "api"
    env = _env(tmp_path, idle=1)
    procs = [
        subprocess.Popen([sys.executable, "-c", JOIN, str(folder), hold], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for hold in ("0", "6")
    ]
    seen = [p.stdout.readline().split() for p in procs]
    assert seen[0][:2] == seen[1][:2], seen  # one url, one pid
    assert sorted(s[2] for s in seen) == ["False", "True"]  # exactly one of them started it
    pid = int(seen[0][1])
    procs[0].wait(timeout=30)
    time.sleep(3)  # past the idle time: the second process still holds its lease
    assert running(pid), "the API stopped under a command that still runs"
    procs[1].kill()  # its lease now names a dead process
    procs[1].wait()
    assert _wait_gone(pid, within=10), "a killed command's lease kept the API running"


def test_the_api_stops_when_its_prefect_home_is_deleted(tmp_path):
    """A benchmark's or a test's temporary home removed under a running API: nothing can find that
    server again, so it stops at once instead of idling forever."""
    import shutil

    folder = tmp_path / "prefect" / "api"
    env = _env(tmp_path, idle=600)
    proc = subprocess.Popen([sys.executable, "-c", JOIN, str(folder), "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline().split()[1])
    proc.wait(timeout=30)
    assert running(pid)
    shutil.rmtree(folder)  # its address, lock and leases; the database beside it may still be written to
    assert _wait_gone(pid, within=10), "the API outlived its deleted home"
