"""Where a head training step's time goes: inputs (embedding gather + the n-gram bag), forward, loss,
backward, the dense optimizer and the n-gram weights' lazy Adam, in ms per step.

    python tests/bench/step.py [--data TRAIN.jsonl] [--db DB] [--epochs 3] [--repeats 3] [--precision auto|fp32|bf16]

The same ``tasks.fitting.fit`` as ``bucketchat finetune`` (default settings, early stopping off) runs
under torch.profiler, which times the ``step.*`` ranges the training loop marks (models/train.py).
Each repeat runs in its own process; the figures are medians over repeats of each range's mean per
step. The profiler adds its own cost to every op, so read the parts as shares of a step; the
unprofiled speed is ``tests/bench/training.py``'s. A second line per repeat has the lexical path off
(``--lexical_features 0``), to show what the n-grams cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.jsonl"
PARTS = ("step.inputs", "step.forward", "step.loss", "step.backward", "step.optimizer", "step.lexical_optimizer")


def phase_profile(db: str, epochs: int, precision: str, lexical: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from models.config import HeadSettings, TrainConfig
    from retrieval.store import open_table
    from tasks.fitting import fit

    version = int(open_table(db, "conversations").version)
    head_cfg = HeadSettings() if lexical == "on" else HeadSettings(lexical_features=0)
    cfg = TrainConfig(epochs=epochs, early_stop_patience=0, refit=False, precision=precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, meta, _ = fit(db, "conversations", version, cfg, head_cfg)
    steps = next(e.count for e in prof.key_averages() if e.key == "step.backward")
    ms = {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages() if e.key in PARTS}
    return {"lexical": lexical, "batch_size": meta["train_config"]["batch_size"], "steps": steps, "ms_per_step": ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="training JSONL (default BANKING77 train)")
    p.add_argument(
        "--db", help="an existing database folder with a `conversations` table (default: build one from --data in a temp folder)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        db, epochs, precision, lexical = a.phase
        print(json.dumps(phase_profile(db, int(epochs), precision, lexical)))
        return

    def run(*args: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--phase", *args], check=True, stdout=subprocess.PIPE, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        db = a.db
        if db is None:
            from conversations.records import load_records
            from retrieval.build import build_table

            db = str(Path(tmp) / "db")
            build_table(load_records(a.data)[0], db, "conversations")
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for i in range(a.repeats):
            for lexical in ("on", "off"):
                r = run(db, str(a.epochs), a.precision, lexical)
                runs[lexical].append(r)
                parts = "  ".join(f"{k.split('.')[1]} {v:.2f}" for k, v in r["ms_per_step"].items())
                print(f"repeat {i + 1} lexical {lexical}: batch {r['batch_size']}, {r['steps']} steps; ms per step: {parts}", flush=True)
        print(f"\nms per step, median of {a.repeats} (profiled: read as shares):")
        for lexical, rs in runs.items():
            med = {k: statistics.median(r["ms_per_step"].get(k, 0.0) for r in rs) for k in PARTS}
            total = sum(med.values())
            print(
                f"  lexical {lexical:<3} total {total:6.2f}  "
                + "  ".join(f"{k.split('.')[1]} {v:.2f} ({v / total:.0%})" for k, v in med.items() if v)
            )


if __name__ == "__main__":
    main()
