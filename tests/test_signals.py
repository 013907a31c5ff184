"""Ctrl-C, SIGTERM and kill -9 sent to real ``bucketchat`` processes in the middle of their work:
each stops within 2 s with one line and no traceback, leaves no process of ours running (checked
by pid) but the local Prefect API that commands share, which stops once idle, and its Prefect flow
runs end Crashed, never Running."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.reliability import descendants, leftover, running, shared_api
from tests.conftest import SAMPLE, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _gone(pids: set[int], within: float = 5.0) -> set[int]:
    """The pids still running after ``within`` seconds."""
    leftover(pids, within)
    return {p for p in pids if running(p)}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One Prefect home for the module (its database is made once), MLflow beside it."""
    home = tmp_path_factory.mktemp("home")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BUCKETCHAT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "BUCKETCHAT_PREFECT_IDLE_S": "2",
    }
    env.pop("PREFECT_API_URL", None)  # commands share a local API, as a user's do
    return home, env


def _start(args: list[str], env: dict, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "interfaces.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _flow_runs(home: Path, pid: int) -> list[str]:
    """The state of every flow run the process ``pid`` made, from Prefect's own database."""
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        rows = db.execute("select state_type, tags from flow_run").fetchall()
    return sorted(state for state, tags in rows if f":{pid}:" in tags)


def _stop(proc: subprocess.Popen, sig: int, home: Path) -> tuple[float, str]:
    helpers = descendants(proc.pid) - {shared_api(home)}
    start = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - start
    assert not _gone(helpers), "a process of ours outlived its command"
    return took, err.decode()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_pipeline_mid_run_within_2_s(tmp_path, home, sig, status):
    folder, env = home
    proc = _start(["pipeline", "--data", str(SAMPLE), "--workdir", str(tmp_path / "work"), "--epochs", "400"], env, tmp_path)
    _wait_for(tmp_path / "work" / "llm_chat.db", proc)  # the table is being built; training follows
    time.sleep(3)
    took, err = _stop(proc, sig, folder)
    assert proc.returncode == status and took < 2.0, (took, err)
    assert [l for l in err.splitlines() if l] == [
        f"bucketchat pipeline: stopped by {signal.Signals(sig).name}; files it writes are replaced whole, so nothing half-written was kept (run it again to continue)"
    ]
    runs = _flow_runs(folder, proc.pid)
    assert runs and "RUNNING" not in runs and "CRASHED" in runs


def test_kill_9_leaves_no_process_past_the_apis_idle_time_and_the_next_command_marks_its_runs_crashed(tmp_path, home, tiny_records):
    folder, env = home
    proc = _start(
        [
            "finetune",
            "--data",
            str(SAMPLE),
            "--db",
            str(tmp_path / "db"),
            "--output",
            str(tmp_path / "m.pth"),
            "--meta",
            str(tmp_path / "m.json"),
            "--epochs",
            "400",
        ],
        env,
        tmp_path,
    )
    _wait_for(tmp_path / "db", proc)
    time.sleep(3)
    api = shared_api(folder)
    assert api and running(api), "the command should use the shared local Prefect API"
    helpers = descendants(proc.pid) - {api}
    proc.kill()
    proc.wait()
    assert not _gone(helpers), "a process of ours outlived a kill -9 of its command"
    assert not _gone({api}, within=10), "the shared Prefect API kept running after its last user was killed"
    assert "RUNNING" in _flow_runs(folder, proc.pid)  # nothing could record the end...

    tiny = write_jsonl(tmp_path / "tiny.jsonl", tiny_records)
    nxt = subprocess.run(
        [
            sys.executable,
            "-m",
            "interfaces.cli",
            "expand",
            "--input",
            str(tiny),
            "--output",
            str(tmp_path / "grown.jsonl"),
            "--target",
            "30",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert nxt.returncode == 0, nxt.stderr
    runs = _flow_runs(folder, proc.pid)
    assert runs and set(runs) <= {"COMPLETED", "CRASHED"} and "CRASHED" in runs  # ...so the next command did


def test_chat_and_serve_stop_on_a_signal_within_2_s(tmp_path, home, chat_model):
    _, env = home
    weights, meta = chat_model
    chat = _start(["chat", "--weights", weights, "--meta", meta, "--json"], env, tmp_path, stdin=subprocess.PIPE)
    chat.stdin.write(b"where is my parcel\n")
    chat.stdin.flush()
    assert b'"line": 1' in chat.stdout.readline()  # answering; stdin stays open
    took, err = _stop(chat, signal.SIGTERM, home[0])
    assert chat.returncode == 143 and took < 2.0 and "Traceback" not in err and len([l for l in err.splitlines() if l]) == 1

    from tests.conftest import free_port

    port = free_port()
    serve = _start(["serve", "--weights", weights, "--meta", meta, "--port", str(port)], env, tmp_path)
    assert b"serving" in serve.stdout.readline()
    time.sleep(0.5)
    took, err = _stop(serve, signal.SIGINT, home[0])
    assert serve.returncode == 130 and took < 2.0 and "Traceback" not in err, err
