"""Incremental retraining: `bucketchat retrain` on a drops folder, cold, then rerun on the unchanged
folder (which must write no table version and train nothing).

    python tests/bench/retrain.py [--data TRAIN.jsonl] [--repeats 3] [--json OUT]

One drop (default BANKING77 train, 10,003 rows) in a temp folder, with a fresh MLflow store and
state home; the cold run is the baseline the unchanged reruns are compared with in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.jsonl"


def run(work: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "bucketchat"), "retrain", "--data_dir", str(work / "drops"), "--workdir", str(work / "run")],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"bucketchat retrain failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--repeats", type=int, default=3, help="unchanged reruns")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not a.data.is_file():
        sys.exit(f"--data {a.data} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        work = Path(tmp)
        (work / "drops").mkdir()
        shutil.copy(a.data, work / "drops" / a.data.name)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "BUCKETCHAT_HOME": str(work / "home")}
        cold, out = run(work, env)
        print(f"cold: {cold:.1f} s", flush=True)
        reruns = []
        for i in range(a.repeats):
            s, out = run(work, env)
            if "unchanged: no new version written" not in out or "stays as it was" not in out:
                sys.exit(f"rerun {i + 1} on the unchanged folder changed something:\n{out}")
            reruns.append(s)
            print(f"unchanged rerun {i + 1}: {s:.1f} s", flush=True)
    med = statistics.median(reruns)
    print(
        f"\ncold {cold:.1f} s; unchanged rerun median {med:.1f} s (min {min(reruns):.1f}, max {max(reruns):.1f}) = {med / cold:.2f}x the cold run; no table version written, nothing trained"
    )
    if a.json:
        a.json.write_text(json.dumps({"data": str(a.data), "cold_s": cold, "unchanged_s": reruns}, indent=2))


if __name__ == "__main__":
    main()
