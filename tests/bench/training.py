"""Training throughput and memory: head training on frozen embeddings (every size), and --train_all.

    python tests/bench/training.py [--data TRAIN.jsonl] [--repeats 3] [--train_all_rows 10000] [--precision auto|fp32|bf16] [--no_lexical] [--json OUT]

The table is built once from ``--data`` (default BANKING77 train, 10,003 rows) in a temp folder.
Each measurement runs in its own process (so peak RSS is its own), through the same code as
``bucketchat finetune`` (``tasks.fitting.fit``): examples/s counts training rows seen per second of
epoch time (validation excluded). The baseline, measured in the same run on the same vectors, is
scikit-learn's LogisticRegression fit (rows x iterations / s is not comparable, so it is reported as
wall time for the whole fit next to the head's whole fit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.jsonl"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_build(data: str, db: str) -> dict:
    from conversations.records import load_records
    from retrieval.build import build_table

    pairs, _ = load_records(data)
    t0 = time.perf_counter()
    res = build_table(pairs, db, "conversations")
    return {"version": res.version, "rows": res.rows, "build_s": time.perf_counter() - t0}


def phase_head(db: str, version: int, size: str, epochs: int, precision: str, lexical: str = "on") -> dict:
    from models.config import HeadSettings, TrainConfig
    from tasks.fitting import fit

    t0 = time.perf_counter()
    head, meta, _ = fit(
        db,
        "conversations",
        version,
        TrainConfig(epochs=epochs, early_stop_patience=0, precision=precision),
        HeadSettings(model_size=size, lexical_features=None if lexical == "on" else 0),
    )
    return {
        "size": size,
        "examples_per_second": meta["metrics"]["examples_per_second"],
        "fit_s": time.perf_counter() - t0,
        "val_response_acc": meta["metrics"].get("val_response_acc"),
        "peak_rss_mb": peak_mb(),
        "batch_size": meta["train_config"]["batch_size"],
    }


def phase_baseline(db: str, version: int) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from retrieval.table_rows import table_rows

    rows = table_rows(db, "conversations", version)
    t0 = time.perf_counter()
    LogisticRegression(C=10, max_iter=2000).fit(rows["vectors"], np.asarray(rows["responses"]))
    return {"fit_s": time.perf_counter() - t0, "peak_rss_mb": peak_mb()}


def phase_train_all(db: str, version: int, rows: int, precision: str) -> dict:
    """One epoch of --train_all over ``rows`` training examples (encoder + head), progress shown."""
    import numpy as np
    import torch

    from models.candidates import Candidates
    from models.config import HeadConfig, TrainConfig
    from models.heads import BucketHead
    from models.train import Trainable, TrainData, train
    from retrieval.table_rows import table_rows
    from retrieval.trainable_encoder import TrainableEncoder

    torch.set_num_threads(os.cpu_count() or 1)
    r = table_rows(db, "conversations", version)
    n = min(rows, len(r["ids"]))
    cands = Candidates.select(r["responses"][:n], r["buckets"][:n].tolist(), 256)
    y_cand = cands.targets(r["responses"][:n], r["buckets"][:n].tolist())
    head = BucketHead(
        HeadConfig(num_candidates=len(cands.texts), lexical_features=0), torch.tensor(cands.buckets), torch.tensor(cands.learned)
    )
    data = TrainData(r["buckets"][:n], y_cand, texts=r["users"][:n])
    t0 = time.perf_counter()
    res = train(
        Trainable(head, TrainableEncoder()),
        data,
        train_idx=np.arange(n),
        val_idx=np.array([], dtype=np.int64),
        cfg=TrainConfig(epochs=1, batch_size=32, train_all=True, precision=precision),
        progress=True,
    )
    return {"rows": n, "epoch_s": time.perf_counter() - t0, "examples_per_second": res.examples_per_second, "peak_rss_mb": peak_mb()}


def run_phase(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="epochs per head fit (early stopping off)")
    p.add_argument("--sizes", nargs="+", default=["base", "large", "xlarge", "xxlarge"])
    p.add_argument("--train_all_rows", type=int, default=10000, help="rows of the --train_all epoch (0 skips it)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training arithmetic, as `bucketchat finetune --precision` (run fp32 and bf16 to compare them)",
    )
    p.add_argument("--no_lexical", action="store_true", help="heads without the n-gram path (`--lexical_features 0`), to see what it costs")
    p.add_argument("--json", type=Path)
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        name, *rest = a.phase
        fn = {"build": phase_build, "head": phase_head, "baseline": phase_baseline, "train_all": phase_train_all}[name]
        args = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["BUCKETCHAT_HOME"] = str(Path(tmp) / "home")
        db = str(Path(tmp) / "db")
        built = run_phase("build", a.data, db)
        print(f"table: {built['rows']} rows (built in {built['build_s']:.1f} s)", flush=True)
        report: dict = {"data": a.data, "rows": built["rows"], "build_s": built["build_s"], "heads": {}, "baseline": []}
        for i in range(a.repeats):
            report["baseline"].append(run_phase("baseline", db, str(built["version"])))
            for size in a.sizes:
                r = run_phase("head", db, str(built["version"]), size, str(a.epochs), a.precision, "off" if a.no_lexical else "on")
                report["heads"].setdefault(size, []).append(r)
                print(
                    f"repeat {i + 1} {size}: {r['examples_per_second']:,.0f} examples/s, fit {r['fit_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB (baseline LR fit {report['baseline'][-1]['fit_s']:.1f} s)",
                    flush=True,
                )
        lr_fit = statistics.median(b["fit_s"] for b in report["baseline"])
        print(
            f"\nhead training, frozen encoder, {a.epochs} epochs, median of {a.repeats} (LogisticRegression fit on the same vectors: {lr_fit:.1f} s):"
        )
        for size, runs in report["heads"].items():
            eps = [r["examples_per_second"] for r in runs]
            fit_s = statistics.median(r["fit_s"] for r in runs)
            print(
                f"  {size:<8} {statistics.median(eps):>9,.0f} examples/s (min {min(eps):,.0f}, max {max(eps):,.0f})  fit {fit_s:.1f} s = {fit_s / lr_fit:.2f}x LR  peak {max(r['peak_rss_mb'] for r in runs):.0f} MB"
            )
        if a.train_all_rows:
            r = run_phase("train_all", db, str(built["version"]), str(a.train_all_rows), a.precision)
            report["train_all"] = r
            print(
                f"  --train_all: one epoch of {r['rows']} rows in {r['epoch_s']:.0f} s ({r['examples_per_second']:.0f} examples/s), peak {r['peak_rss_mb']:.0f} MB"
            )
        if a.json:
            a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
