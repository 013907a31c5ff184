"""What a command costs before it does its job: each figure is a fresh `bucketchat` process, timed
from its start (medians over --repeats).

    python tests/bench/startup.py [--repeats 5] [--json OUT]
    python tests/bench/compare.py REF startup.py --this-script --repeats 1 -- --repeats 5   # beside REF

- ``arg_error_s``: a missing --data file, to the exit with the one-line error;
- ``pipeline_s``: the bundled sample's whole pipeline on a new workdir and a new MLflow store (the
  encoder cache and Prefect's home already made, and the local Prefect API that commands share
  already up; ``pipeline_first_s`` is the first run, which makes Prefect's home and starts that API);
- ``chat_first_answer_s``: `bucketchat chat --json` with one piped message, to its first answer;
- ``serve_ready_s``: `bucketchat serve`, to the first 200 from /healthz;
- with ``--big`` only ``chat_first_answer_100k_s``: chat's first answer on the BANKING77 model and
  100k-row table that tests/bench/latency.py leaves in .bucketchat/bench-latency (run it first).

Runs the `bucketchat` next to this Python, so compare.py's --this-script times an earlier commit
with the same script. Everything it makes goes under .bucketchat/bench-startup (replaced each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUCKETCHAT = str(Path(sys.executable).parent / "bucketchat")
SAMPLE = ROOT / "conversation_data.sample.jsonl"


def timed(cmd: list[str], env: dict, stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, done


def first_answer(env: dict) -> float:
    """From spawning `chat --json` to its first line on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([BUCKETCHAT, "chat", "--json"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write("where is my parcel?\n")
    proc.stdin.close()
    line = proc.stdout.readline()
    took = time.perf_counter() - start
    proc.wait(timeout=60)
    assert json.loads(line)["response"], line
    return took


def first_answer_big(env: dict) -> float:
    """`first_answer` with the 100k-row table, through --weights/--meta/--llm_db (no registry)."""
    big = ROOT / ".bucketchat" / "bench-latency"
    model = big / "model"
    if not (model / "meta.json").is_file() or not (big / "big.db").is_dir():
        raise SystemExit(f"{big} has no model or big.db; run `python tests/bench/latency.py` first")
    cmd = [BUCKETCHAT, "chat", "--json", "--weights", str(model / "head.safetensors"), "--meta", str(model / "meta.json")]
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--llm_db", str(big / "big.db")], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write("I lost my card\n")
    proc.stdin.close()
    line = proc.stdout.readline()
    took = time.perf_counter() - start
    proc.wait(timeout=60)
    assert json.loads(line)["response"], line
    return took


def serve_ready(env: dict) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    proc = subprocess.Popen([BUCKETCHAT, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stop_shared_api(prefect_home: Path) -> None:
    """Stop the local Prefect API a previous run left idling on this home (flows/local_api.py), so
    that every run starts from the same state; code without a shared API leaves none."""
    try:
        state = json.loads((prefect_home / "api" / "api.json").read_text())
        os.kill(state["pid"], signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return
    for _ in range(100):
        if not Path(f"/proc/{state['pid']}").exists():
            return
        time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--big", action="store_true", help="only chat's first answer with the 100k-row table")
    a = p.parse_args()
    home = ROOT / ".bucketchat" / "bench-startup"
    stop_shared_api(home / "home" / "prefect")
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "BUCKETCHAT_HOME": str(home / "home")}
    env.pop("PREFECT_API_URL", None)
    if a.big:
        runs = [first_answer_big(env) for _ in range(a.repeats)]
        result = {"chat_first_answer_100k_s": round(statistics.median(runs), 2), "runs": runs}
        print(json.dumps(result, indent=2))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
        return
    runs: dict[str, list[float]] = {"arg_error_s": [], "pipeline_s": [], "chat_first_answer_s": [], "serve_ready_s": []}
    first = None
    for i in range(a.repeats + 1):  # run 0 makes Prefect's home: reported on its own
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / f'mlflow-{i}' / 'mlflow.db'}"
        took, done = timed([BUCKETCHAT, "pipeline", "--data", str(SAMPLE), "--workdir", str(home / f"work-{i}")], env)
        assert done.returncode == 0, done.stdout + done.stderr
        if i == 0:
            first = took
            continue
        runs["pipeline_s"].append(took)
        took, done = timed([BUCKETCHAT, "pipeline", "--data", str(home / "missing.jsonl")], env)
        assert done.returncode == 2, done.stderr
        runs["arg_error_s"].append(took)
        runs["chat_first_answer_s"].append(first_answer(env))
        runs["serve_ready_s"].append(serve_ready(env))
        print(f"[{i}/{a.repeats}] " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()), flush=True)
    stop_shared_api(home / "home" / "prefect")  # not left idling beside the next run (compare.py interleaves)
    result = {"pipeline_first_s": round(first, 2), **{k: round(statistics.median(v), 2) for k, v in runs.items()}, "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
