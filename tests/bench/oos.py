"""Out-of-scope fallback, measured: hold some BANKING77 intents out of training entirely, then ask
their test messages (which the bot cannot answer), general questions no banking bot should answer,
and the in-scope test messages.

    python tests/bench/oos.py [--holdout 10] [--seed 0] [--json OUT] [-- PIPELINE FLAGS, e.g. --encoder FOLDER]

The held-out intents are drawn by seed from the intent names (never by looking at results). The
pipeline trains on the rest of train.jsonl with defaults (`bucketchat pipeline`), then
`bucketchat eval --data IN_SCOPE_TEST --oos OFF_TOPIC --json` scores two kinds of off-topic message:
  near   the held-out intents' test messages (a banking bot's unseen banking topics);
  far    every user turn of ../shared/data/oasst (OpenAssistant, Apache-2.0): general questions,
         from a source nothing here trains on;
for several threshold settings (`--min_confidence` / `--min_margin` / `--min_similarity` overrides
of the calibrated values):
  recall                share of off-topic messages that get the fallback (higher is better)
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
OASST = ROOT.parent / "shared" / "data" / "oasst"
sys.path.insert(0, str(ROOT))
from conversations.text import MAX_MESSAGE_CHARS  # noqa: E402

BIN = Path(sys.executable).parent

# (label, extra eval flags): the calibrated gates, without the similarity gate, it alone, none.
SETTINGS = [
    ("calibrated (all three gates)", []),
    ("confidence + margin (no similarity)", ["--min_similarity", "0"]),
    ("similarity only", ["--min_confidence", "0", "--min_margin", "0"]),
    ("no fallback", ["--min_confidence", "0", "--min_margin", "0", "--min_similarity", "0"]),
]


def general_questions() -> list[str]:
    """Every user turn of the OpenAssistant files, once each."""
    seen: dict[str, None] = {}
    for path in sorted(OASST.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line) if line.strip() else {}
            turns = [m["content"] for m in r.get("messages", []) if m.get("role") == "user"] or [r.get("user")]
            seen.update((t.strip(), None) for t in turns if t and t.strip())
    return [q for q in seen if len(q) <= MAX_MESSAGE_CHARS]  # chat refuses longer messages outright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holdout", type=int, default=10, help="intents held out of training (default 10 of 77)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--defaults_only", action="store_true", help="only the calibrated setting and no fallback (a slow encoder)")
    p.add_argument("pipeline_args", nargs="*", help="extra `bucketchat pipeline` flags after --, e.g. -- --encoder FOLDER")
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
        kinds = {
            "near": write("near.jsonl", [r for r in test if r.get("intent") in held and "user" in r]),
            "far": write("far.jsonl", [{"user": q} for q in general_questions()]),
        }
        counts = {"in_scope": len(ins.read_text().splitlines()), **{k: len(p.read_text().splitlines()) for k, p in kinds.items()}}
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp / "home")}
        t0 = time.perf_counter()
        subprocess.run(
            [BIN / "bucketchat", "pipeline", "--data", str(tr), "--workdir", str(tmp / "run"), *a.pipeline_args],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(
            f"held out {a.holdout} intents ({', '.join(sorted(held))}); pipeline on the other {len(intents) - a.holdout}: {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        results, curves = [], {}
        for label, flags in SETTINGS if not a.defaults_only else [SETTINGS[0], SETTINGS[-1]]:
            row = {"setting": label, "flags": flags}
            for kind, path in kinds.items():
                out = subprocess.run(
                    [BIN / "bucketchat", "eval", "--data", str(ins), "--oos", str(path), "--json", *flags],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out)
                row[f"{kind}_recall"] = r["oos"]["recall"]
                if not flags:
                    curves[kind] = r["oos"].get("tradeoff", [])
                row |= {
                    "in_scope_accuracy": r["response_accuracy"],
                    "in_scope_ranking": r["ranking_accuracy"],
                    "in_scope_fallback": r["fallback_rate"],
                    "thresholds": r["thresholds"],
                }
            results.append(row)
    print(f"\n{counts['in_scope']} in-scope, {counts['near']} near and {counts['far']} far off-topic test messages")
    print(
        f"  {'setting':<36} {'near recall':>11} {'far recall':>10} {'in-scope acc':>12} {'cost':>7}  thresholds (confidence, margin, similarity)"
    )
    for r in results:
        t = r["thresholds"]
        print(
            f"  {r['setting']:<36} {r['near_recall']:>11.2%} {r['far_recall']:>10.2%} {r['in_scope_accuracy']:>12.2%} "
            f"{r['in_scope_ranking'] - r['in_scope_accuracy']:>7.2%}  ({t['min_confidence']:.3f}, {t['min_margin']:.3f}, {t.get('min_similarity', 0):.3f})"
        )
    if a.json:
        a.json.write_text(json.dumps({"held_out": sorted(held), "counts": counts, "results": results, "tradeoff": curves}, indent=2))


if __name__ == "__main__":
    main()
