"""prefect.yaml for real, on loopback: `ops/local-prefect.sh up` (server, pool, `prefect deploy --all
--no-prompt`), `prefect deployment run`, a process worker with `--run-once`, then the flow runs'
states from the server and the model versions from the MLflow registry; `down` stops it all."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_deployments_run_on_a_local_server_with_a_process_worker(tmp_path, tiny_records):
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "BIN": str(BIN),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "BUCKETCHAT_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "NO_WORKER": "1",  # the test runs its own worker with --run-once
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    # Only the project's settings: no test-harness Prefect variables leak into the real server.
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    script = ROOT / "ops" / "local-prefect.sh"

    def prefect(*args: str, timeout: int = 120) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    data = write_jsonl(tmp_path / "d.jsonl", tiny_records)
    drops = tmp_path / "drops"
    drops.mkdir()
    write_jsonl(drops / "drop-1.jsonl", tiny_records)
    # What `bucketchat review` writes: the retrain deployment learns it with the rest of the folder.
    reviewed = [
        {"user": "tips for jet lag", "assistant": "Shift your sleep an hour a day before you fly.", "reviewed_by": "test"},
        {"user": "who won the 1954 world cup?", "out_of_scope": True, "reviewed_by": "test"},
    ]
    write_jsonl(drops / "review-20261203T120000Z-abcdef.jsonl", reviewed)
    quick = {"target": 0, "train": {"epochs": 3}, "head": {"hidden_dim": 32}}
    try:
        up = subprocess.run([str(script), "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (
            "Deployment 'pipeline/pipeline'" in up.stdout
            and "Deployment 'retrain/retrain'" in up.stdout
            and "Deployment 'size-sweep/size-sweep'" in up.stdout
        )
        assert "'cron': '0 3 * * *'" in prefect("deployment", "inspect", "retrain/retrain")

        # The CLI first, on the same data and settings as the pipeline deployment below: that run
        # then finds the CLI's version trained from the same key and trains nothing.
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "interfaces.cli",
                "pipeline",
                "--data",
                str(data),
                "--workdir",
                str(tmp_path / "work"),
                "--epochs",
                "3",
                "--hidden_dim",
                "32",
            ],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0 and "registered bucketchat v1: CHAMPION" in cli.stdout, cli.stdout + cli.stderr

        runs = {}
        for name, params in (
            ("pipeline/pipeline", {"data": [str(data)], "workdir": str(tmp_path / "work"), **quick}),
            ("retrain/retrain", {"data_dir": str(drops), "workdir": str(tmp_path / "work-retrain"), **quick}),
        ):
            out = prefect("deployment", "run", name, "--params", json.dumps(params))
            runs[name] = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "bucketchat-process", "--run-once"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        for name, run_id in runs.items():
            state = prefect("flow-run", "inspect", run_id)
            # On failure, the worker's log holds the flow run's traceback.
            assert "type=StateType.COMPLETED" in state, (
                f"{name}: {state[-300:]}\nworker log:\n{worker.stdout[-8000:]}{worker.stderr[-8000:]}"
            )

        check = subprocess.run(
            [sys.executable, "-c", "import json; from tasks import registry; print(json.dumps(registry.list_versions()))"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        versions = json.loads(check.stdout.strip().splitlines()[-1])
        # Three training runs asked for, two versions: the CLI's v1, and v2 from retrain (its own
        # workdir, so its own table and key). The pipeline deployment found v1 under its key and
        # trained nothing (before one set of run settings, its key differed from the CLI's).
        assert sorted(v["version"] for v in versions) == [1, 2]
        assert [v["aliases"] for v in versions if v["version"] == 1] in ([["champion"]], [[]])
        assert all(v["promotion"] for v in versions)
        from conversations.records import OUT_OF_SCOPE
        from retrieval.store import open_table

        rows = (
            open_table(str(tmp_path / "work-retrain" / "llm_chat.db"), "conversations").to_arrow().select(["user", "assistant"]).to_pylist()
        )
        assert {"user": "who won the 1954 world cup?", "assistant": OUT_OF_SCOPE} in rows and any(
            r["user"] == "tips for jet lag" for r in rows
        )
    finally:
        down = subprocess.run([str(script), "down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "stopped server" in down.stdout
    status = subprocess.run([str(script), "status"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    assert status.split() == ["server:", "stopped", "worker:", "stopped"]
