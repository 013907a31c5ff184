"""The loop from production back to training, end to end on real components and through the commands
a user runs: a champion trained without one topic is served; that topic's questions sent over HTTP
need review (they fall back or are unsure); `bucketchat review` (input piped, as a person would
type it) gives them a response; `bucketchat retrain` (the flow the nightly retrain deployment runs)
trains and promotes a new champion, which answers held-out askings of the topic, in chat and
through `mlflow models serve`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, http_process, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "conversation_data.sample.jsonl"
TOPIC = "jet_lag"


@pytest.mark.slow
def test_a_missed_topic_is_reviewed_retrained_and_then_answered(tmp_path, prefect_api_env):
    records = [json.loads(l) for l in SAMPLE.read_text(encoding="utf-8").splitlines()]
    topic = [r for r in records if r.get("intent") == TOPIC]
    response = topic[0]["assistant"]
    # Every record that carries the topic's response goes, multi-turn ones too.
    base = [r for r in records if response not in json.dumps(r, ensure_ascii=False)]
    asked, held_out = [r["user"] for r in topic[:6]], [r["user"] for r in topic[6:]]
    drops = tmp_path / "drops"
    drops.mkdir()
    write_jsonl(drops / "base.jsonl", base)
    env = {
        **os.environ,
        **prefect_api_env,
        "PYTHONPATH": str(ROOT),
        "BUCKETCHAT_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }

    def bucketchat(*args: str, stdin: str = "") -> str:
        done = subprocess.run(
            [sys.executable, "-m", "interfaces.cli", *args], input=stdin, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def answers(questions: list[str]) -> list[dict]:
        return [json.loads(l) for l in bucketchat("chat", "--json", "--no_log", stdin="\n".join(questions) + "\n").splitlines()]

    retrain = ["retrain", "--data_dir", str(drops), "--workdir", str(tmp_path / "work")]
    assert "registered bucketchat v1: CHAMPION" in bucketchat(*retrain)
    before = answers(held_out)
    assert not any(a["response"] == response for a in before)

    port = free_port()
    serve = [sys.executable, "-m", "interfaces.cli", "serve", "--port", str(port), "--workers", "1", "--drop_dir", str(drops)]
    with http_process(serve, f"http://127.0.0.1:{port}/healthz", tmp_path / "serve.log", env=env, cwd=str(ROOT)):
        served = []
        for i, q in enumerate(asked):
            body = {"messages": [{"role": "user", "content": q}], "conversation_id": f"user-{i}"}
            served.append(httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()["bucketchat"])
    assert all(s["fallback"] or s["confidence"] < 0.7 for s in served), served
    assert sum(s["fallback"] for s in served) >= 1

    # The person: a new response for the first group, then that response (offered first) for the rest.
    typed = f"n\n{response}\n" + "1\n" * len(asked)
    out = bucketchat("review", "--drop_dir", str(drops), "--reviewer", "test", "--below", "0.7", stdin=typed)
    assert f"on {len(asked)} turns written to" in out, out
    (drop,) = drops.glob("review-*.jsonl")
    reviewed = [json.loads(l) for l in drop.read_text().splitlines()]
    assert sorted(r["user"] for r in reviewed) == sorted(asked)
    assert all(r["assistant"] == response and r["reviewed_by"] == "test" and len(r["turns"]) == 1 for r in reviewed)
    assert "nothing to review" in bucketchat("review", "--drop_dir", str(drops), "--below", "0.7", "--list")

    assert "registered bucketchat v2: CHAMPION" in bucketchat(*retrain)
    after = answers(held_out)
    assert [a["response"] for a in after] == [response] * len(held_out), after

    # The new champion is a standard MLflow model: `mlflow models serve` answers with it too.
    port = free_port()
    mlflow_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/bucketchat@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "mlflow-serve.log", env=mlflow_env, cwd=str(ROOT), timeout=120):
        body = {"dataframe_split": {"columns": ["message"], "data": [[q] for q in held_out]}}
        got = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).json()["predictions"]
    assert [p["response"] for p in got] == [response] * len(held_out) and not any(p["fallback"] for p in got)
