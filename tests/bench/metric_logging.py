"""Why training logs its metrics through ``tasks.training.MetricBuffer`` and not MLflow's own async
logging: the same per-step metrics into a fresh SQLite store, both ways, in one process.

    python tests/bench/metric_logging.py [--steps 3000] [--repeats 3] [--json out.json]

Prints the median seconds of each and their ratio; every run is checked to hold all its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
METRICS = {"step_loss": 0.1, "step_lr": 0.01, "step_pref_loss": 0.2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='bucketchat-metrics-')}/mlflow.db"
    import mlflow
    from tasks.training import MetricBuffer

    mlflow.set_experiment("metric-logging")
    client = mlflow.MlflowClient()

    def buffered() -> str:
        with mlflow.start_run() as run:
            buffer = MetricBuffer(run.info.run_id)
            for step in range(a.steps):
                buffer.add(METRICS, step)
            buffer.flush()
        return run.info.run_id

    def asynchronous() -> str:
        with mlflow.start_run() as run:
            for step in range(a.steps):
                mlflow.log_metrics(METRICS, step=step, synchronous=False)
            mlflow.flush_async_logging()
        return run.info.run_id

    times: dict[str, list[float]] = {"MetricBuffer (log_batch)": [], "mlflow.log_metrics(synchronous=False)": []}
    for _ in range(a.repeats):  # interleaved, so a busy spell of the machine hits both
        for name, fn in zip(times, (buffered, asynchronous)):
            t0 = time.perf_counter()
            run_id = fn()
            times[name].append(time.perf_counter() - t0)
            assert len(client.get_metric_history(run_id, "step_loss")) == a.steps
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["MetricBuffer (log_batch)"]
    result = {
        "steps": a.steps,
        "metrics_per_step": len(METRICS),
        "median_s": medians,
        "ratio_to_buffer": {k: v / base for k, v in medians.items()},
    }
    for k, v in medians.items():
        print(f"{k:<40} {v:7.2f} s  ({v / base:.1f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
