"""Out-of-scope fallback, measured: hold some BANKING77 intents out of training entirely, then ask
their test messages (which the bot cannot answer) and the in-scope test messages.

    python tests/bench/oos.py [--holdout 10] [--seed 0] [--json OUT]

The held-out intents are drawn by seed from the intent names (never by looking at results). The
pipeline trains on the rest of train.jsonl with defaults (`bucketchat pipeline`), then
`bucketchat eval --data IN_SCOPE_TEST --oos HELD_OUT_TEST --json` scores, for several threshold
settings (`--min_confidence` / `--min_margin` overrides of the calibrated values):
  out-of-scope recall   share of held-out messages that get the fallback (higher is better)
  in-scope accuracy     response accuracy on the trained intents (a fallback counts as wrong)
  in-scope cost         ranking accuracy minus response accuracy: right answers lost to the fallback
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "banking77"
BIN = Path(sys.executable).parent

# (label, extra eval flags): the calibrated thresholds, each alone, none, and stricter ones.
SETTINGS = [
    ("calibrated (confidence + margin)", []),
    ("confidence only", ["--min_margin", "0"]),
    ("margin only", ["--min_confidence", "0"]),
    ("no fallback", ["--min_confidence", "0", "--min_margin", "0"]),
    ("confidence >= 0.5", ["--min_confidence", "0.5", "--min_margin", "0"]),
    ("confidence >= 0.7", ["--min_confidence", "0.7", "--min_margin", "0"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holdout", type=int, default=10, help="intents held out of training (default 10 of 77)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    train = [json.loads(l) for l in (DATA / "train.jsonl").read_text().splitlines() if l.strip()]
    test = [json.loads(l) for l in (DATA / "test.jsonl").read_text().splitlines() if l.strip()]
    intents = sorted({r["intent"] for r in train})
    held = set(random.Random(a.seed).sample(intents, a.holdout))
    with tempfile.TemporaryDirectory(prefix="bench-oos-") as tmp:
        tmp = Path(tmp)

        def write(name: str, rows: list[dict]) -> Path:
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
            return tmp / name

        tr = write("train.jsonl", [r for r in train if r["intent"] not in held])
        ins = write("in_scope.jsonl", [r for r in test if r.get("intent") not in held and "user" in r])
        oos = write("oos.jsonl", [r for r in test if r.get("intent") in held and "user" in r])
        counts = (len(ins.read_text().splitlines()), len(oos.read_text().splitlines()))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp / "home")}
        t0 = time.perf_counter()
        subprocess.run(
            [BIN / "bucketchat", "pipeline", "--data", str(tr), "--workdir", str(tmp / "run")],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(
            f"held out {a.holdout} intents ({', '.join(sorted(held))}); pipeline on the other {len(intents) - a.holdout}: {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        results = []
        for label, flags in SETTINGS:
            out = subprocess.run(
                [BIN / "bucketchat", "eval", "--data", str(ins), "--oos", str(oos), "--json", *flags],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out)
            results.append(
                {
                    "setting": label,
                    "flags": flags,
                    "oos_recall": r["oos"]["recall"],
                    "in_scope_accuracy": r["response_accuracy"],
                    "in_scope_ranking": r["ranking_accuracy"],
                    "in_scope_fallback": r["fallback_rate"],
                    "thresholds": r["thresholds"],
                }
            )
    print(f"\n{counts[0]} in-scope and {counts[1]} out-of-scope test messages")
    print(f"  {'setting':<34} {'OOS recall':>10} {'in-scope acc':>12} {'cost':>7}  thresholds (confidence, margin)")
    for r in results:
        t = r["thresholds"]
        print(
            f"  {r['setting']:<34} {r['oos_recall']:>10.2%} {r['in_scope_accuracy']:>12.2%} {r['in_scope_ranking'] - r['in_scope_accuracy']:>7.2%}  ({t['min_confidence']:.3f}, {t['min_margin']:.3f})"
        )
    if a.json:
        a.json.write_text(json.dumps({"held_out": sorted(held), "results": results}, indent=2))


if __name__ == "__main__":
    main()
