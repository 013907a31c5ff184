"""The review loop, measured on BANKING77: how well review groups a new topic's askings, how many
decisions a person makes, and what the retrained bot then answers.

    python tests/bench/review.py grouping [--topics 10] [--seeds 5]
    python tests/bench/review.py loop [--holdout 5] [--seed 0] [--json OUT]

grouping  Askings of ``--topics`` intents (drawn by seed) are grouped as `bucketchat review` groups
          them (retrieval/review.py, the shipped encoder), for several ``--similarity`` cuts:
            purity   share of askings whose group's majority intent is their own (a person's one
                     decision for the group is then right for them)
            groups   decisions a person makes to cover every asking; steps90: biggest groups first,
                     to cover 90 %
          On the train split, which chose the default cut, and on the test split, reported.
loop      ``--holdout`` intents are left out of training; the bot is trained (`bucketchat retrain`
          over a drop folder), then asked half of those intents' test askings through `bucketchat
          chat` (logged, as production would). A scripted person runs `bucketchat review`: for each
          group, in the order shown, the response of the group's majority intent (typed as new the
          first time, picked from the offered list after). `bucketchat retrain` learns the drop;
          `bucketchat eval` scores the other half of the held-out askings (never seen, never reviewed)
          and the in-scope test set, before and after.
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
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "banking77"
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
CUTS = (0.4, 0.45, 0.5, 0.55, 0.6)


def rows(split: str) -> list[dict]:
    return [json.loads(l) for l in (DATA / f"{split}.jsonl").read_text().splitlines() if l.strip()]


def grouping(a) -> None:
    from retrieval.encoder import ENCODER_ID, embed
    from retrieval.review import group

    for split in ("train", "test"):
        data = [r for r in rows(split) if "user" in r]
        intents = sorted({r["intent"] for r in data})
        table = {cut: [] for cut in CUTS}
        for seed in range(a.seeds):
            chosen = set(random.Random(seed).sample(intents, a.topics))
            asked = [r for r in data if r["intent"] in chosen]
            turns = [{"turn": str(i), "message": r["user"], "time": _t(i)} for i, r in enumerate(asked)]
            intent_of = {str(i): r["intent"] for i, r in enumerate(asked)}
            vectors = embed([r["user"] for r in asked], encoder_id=ENCODER_ID)
            for cut in CUTS:
                groups = group(turns, vectors, cut)
                right = sum(Counter(intent_of[t["turn"]] for t in g.turns).most_common(1)[0][1] for g in groups)
                sizes = [len(g.turns) for g in groups]
                covered, steps90 = 0, 0
                for s in sizes:
                    if covered >= 0.9 * len(turns):
                        break
                    covered, steps90 = covered + s, steps90 + 1
                table[cut].append((right / len(turns), len(groups), steps90, len(turns)))
        print(f"\n{split} split: {a.topics} intents per draw, {a.seeds} draws (mean over draws)")
        print(f"  {'similarity':>10} {'purity':>7} {'groups':>7} {'steps90':>8} {'askings':>8}")
        for cut, runs in table.items():
            purity, groups, steps, n = (float(np.mean(c)) for c in zip(*runs))
            print(f"  {cut:>10.2f} {purity:>7.1%} {groups:>7.1f} {steps:>8.1f} {n:>8.0f}")


def _t(i: int):
    from datetime import UTC, datetime, timedelta

    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)


def loop(a) -> None:
    train, test = rows("train"), [r for r in rows("test") if "user" in r]
    responses = json.loads((DATA / "responses.json").read_text())
    intents = sorted({r["intent"] for r in train})
    held = sorted(random.Random(a.seed).sample(intents, a.holdout))
    topic = [r for r in test if r["intent"] in held]
    random.Random(a.seed).shuffle(topic)
    asked, unseen = topic[: len(topic) // 2], topic[len(topic) // 2 :]
    report: dict = {"held_out": held, "asked": len(asked), "unseen": len(unseen)}
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        tmp = Path(tmp)
        drops = tmp / "drops"
        drops.mkdir()

        def write(path: Path, items: list[dict]) -> Path:
            path.write_text("".join(json.dumps(r) + "\n" for r in items))
            return path

        write(drops / "base.jsonl", [r for r in train if r["intent"] not in held])
        in_scope = write(tmp / "in_scope.jsonl", [r for r in test if r["intent"] not in held])
        unseen_file = write(tmp / "unseen.jsonl", unseen)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp / "home")}

        def run(*args: str, stdin: str | None = None) -> str:
            done = subprocess.run([BIN / "bucketchat", *args], env=env, input=stdin, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bucketchat {args[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            return done.stdout

        def scores(stage: str) -> None:
            for name, path in (("unseen", unseen_file), ("in_scope", in_scope)):
                r = json.loads(run("eval", "--data", str(path), "--json"))
                report[f"{stage}_{name}"] = {"accuracy": r["response_accuracy"], "fallback": r["fallback_rate"]}

        retrain = ("retrain", "--data_dir", str(drops), "--workdir", str(tmp / "work"))
        t0 = time.perf_counter()
        run(*retrain)
        report["first_training_s"] = time.perf_counter() - t0
        scores("before")
        answered = [json.loads(l) for l in run("chat", "--json", stdin="".join(r["user"] + "\n" for r in asked)).splitlines()]
        report["asked_fallback_rate"] = float(np.mean([x["fallback"] for x in answered]))

        # The scripted person: the groups as review shows them, each decided by its majority intent.
        flags = ("--drop_dir", str(drops), "--below", str(a.below))
        groups = json.loads(run("review", *flags, "--list", "--json"))
        intent_of = {r["user"]: r["intent"] for r in asked}
        typed, written, lines = [], [], 0
        for g in groups:
            majority = Counter(intent_of[m["message"]] for m in g["messages"] for _ in range(m["count"])).most_common(1)[0][0]
            text = responses[majority]
            if text in written:
                typed.append(f"{written.index(text) + 1}\n")
                lines += 1
            else:
                written.append(text)
                typed.append(f"n\n{text}\n")
                lines += 2
        t0 = time.perf_counter()
        out = run("review", *flags, "--reviewer", "bench", stdin="".join(typed))
        report["review_command_s"] = time.perf_counter() - t0
        reviewed_turns = sum(g["turns"] for g in groups)
        mislabelled = sum(
            sum(
                m["count"]
                for m in g["messages"]
                if intent_of[m["message"]] != Counter(intent_of[x["message"]] for x in g["messages"]).most_common(1)[0][0]
            )
            for g in groups
        )
        report |= {
            "groups": len(groups),
            "lines_typed": lines,
            "responses_written": len(written),
            "reviewed_turns": reviewed_turns,
            "review_coverage": reviewed_turns / len(asked),
            "mislabelled_turns": mislabelled,
            "review_output": out.strip().splitlines()[-1],
        }
        t0 = time.perf_counter()
        out = run(*retrain)
        report["retrain_s"] = time.perf_counter() - t0
        report["retrain_output"] = [l for l in out.splitlines() if "registered" in l or "table:" in l]
        scores("after")
    print(f"held out {a.holdout} intents ({', '.join(held)}); {len(asked)} askings sent, {len(unseen)} kept unseen")
    print(
        f"review: {report['reviewed_turns']} of {len(asked)} asked turns listed ({report['review_coverage']:.0%}), "
        f"{report['groups']} groups, {report['lines_typed']} lines typed, {report['responses_written']} responses written, "
        f"{report['mislabelled_turns']} turns given another intent's response by their group"
    )
    print("retrain: " + " / ".join(report["retrain_output"]))
    for stage in ("before", "after"):
        u, i = report[f"{stage}_unseen"], report[f"{stage}_in_scope"]
        print(
            f"  {stage:<6} unseen askings: {u['accuracy']:.1%} answered right, {u['fallback']:.1%} fell back; "
            f"in-scope test: {i['accuracy']:.2%} right, {i['fallback']:.2%} fell back"
        )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grouping")
    g.add_argument("--topics", type=int, default=10)
    g.add_argument("--seeds", type=int, default=5)
    loop_p = sub.add_parser("loop")
    loop_p.add_argument("--holdout", type=int, default=5)
    loop_p.add_argument("--seed", type=int, default=0)
    loop_p.add_argument("--below", type=float, default=0.5, help="review's --below (default: its own default)")
    loop_p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    grouping(a) if a.what == "grouping" else loop(a)


if __name__ == "__main__":
    main()
