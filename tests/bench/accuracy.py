"""Response accuracy, pipeline wall time and chat latency through the exact commands a user runs.

    python tests/bench/accuracy.py [--train TRAIN.jsonl] [--test TEST.jsonl] [--repeats 3] [--json OUT]

Defaults to BANKING77 (../shared/data/banking77).
For each repeat: `bucketchat pipeline --data TRAIN` in a fresh workdir, MLflow store and Prefect home
(cold: nothing cached; defaults, nothing tuned), then every line of test.jsonl is piped through `bucketchat chat --json`. Correct =
the returned response equals the line's `assistant`; a fallback counts as wrong. The test file is
only ever read here, never by training; its multi-turn lines (no `user` field) are skipped. Prints the median and range over repeats, the pipeline's
wall time, and chat latency percentiles; `--json` writes them to a file too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "banking77"
BIN = Path(sys.executable).parent
# Runs a command with its output to the file argv[1] and prints its peak RSS (KiB) as the last line:
# RUSAGE_CHILDREN of a fresh wrapper.
WRAPPER = "import resource, subprocess, sys; r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"


def run_once(train: Path, test: Path, work: Path, extra: list[str]) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "BUCKETCHAT_HOME": str(work / "home")}
    t0 = time.perf_counter()
    log = work / "pipeline.log"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            str(log),
            str(BIN / "bucketchat"),
            "pipeline",
            "--data",
            str(train),
            "--workdir",
            str(work / "run"),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-40:] if log.is_file() else []
        sys.exit(f"`bucketchat pipeline` failed (exit {done.returncode}); the end of its log:\n" + "\n".join(tail))
    pipeline_s = time.perf_counter() - t0
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
    rows = [r for r in (json.loads(l) for l in test.read_text(encoding="utf-8").splitlines() if l.strip()) if "user" in r]
    t0 = time.perf_counter()
    out = subprocess.run(
        [BIN / "bucketchat", "chat", "--json"],
        env=env,
        check=True,
        input="".join(r["user"].replace("\n", " ") + "\n" for r in rows),
        capture_output=True,
        text=True,
    ).stdout
    chat_s = time.perf_counter() - t0
    answers = [json.loads(l) for l in out.splitlines()]
    assert len(answers) == len(rows), f"{len(answers)} answers for {len(rows)} questions"
    correct = sum(a["response"] == r["assistant"] and not a["fallback"] for a, r in zip(answers, rows))
    # What the ranking alone would score if nothing fell back: separates routing from calibration.
    top = sum(bool(a["candidates"]) and a["candidates"][0]["response"] == r["assistant"] for a, r in zip(answers, rows))
    lat = sorted(a["latency_ms"] for a in answers)
    return {
        "accuracy": correct / len(rows),
        "accuracy_without_fallback": top / len(rows),
        "fallback_rate": sum(a["fallback"] for a in answers) / len(rows),
        "pipeline_s": pipeline_s,
        "pipeline_peak_rss_mb": peak_mb,
        "chat_process_s": chat_s,
        "latency_p50_ms": lat[len(lat) // 2],
        "latency_p99_ms": lat[int(len(lat) * 0.99)],
        "questions": len(rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    p.add_argument("--test", type=Path, default=DATA / "test.jsonl")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("pipeline_args", nargs="*", help="extra `bucketchat pipeline` flags after --, e.g. -- --target 5000")
    a = p.parse_args()
    if not a.train.is_file():
        sys.exit(f"--train {a.train} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    runs = []
    for i in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-b77-") as tmp:
            runs.append(run_once(a.train, a.test, Path(tmp), a.pipeline_args))
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in runs[-1].items()), flush=True)
    summary = {
        k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
        for k in runs[0]
        if k != "questions"
    }
    print(f"\n{a.train.name} {' '.join(a.pipeline_args)} -> {a.test.name}, {a.repeats} run(s), {runs[0]['questions']} questions")
    for k, v in summary.items():
        print(f"  {k:>16}: median {v['median']:.4f}  (min {v['min']:.4f}, max {v['max']:.4f})")
    if a.json:
        a.json.write_text(json.dumps({"train": str(a.train), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
