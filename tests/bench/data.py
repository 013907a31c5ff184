"""Data-stage speed and memory through the commands a user runs.

    python tests/bench/data.py [--repeats 3]

1. `bucketchat expand` 5,000 -> 120,000 records (the first 5,000 pairs of BANKING77 train).
2. `bucketchat build-super` over three inputs totalling 260,000 records: expansions of BANKING77
   train (120k), test (60k) and train again with another seed (80k), which overlap the way merged,
   re-exported real sources do.

Each command runs in a fresh process (cold: Prefect's temporary server start included) under a small
wrapper that reports the command's peak RSS. Prints medians with min/max over the repeats.
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
# Runs a command and prints its peak RSS (KiB) as the last line: RUSAGE_CHILDREN of a fresh wrapper.
WRAPPER = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    return elapsed, int(lines[-1]) / 1024, "\n".join(lines[:-1])


def make_inputs(folder: Path) -> tuple[Path, list[Path]]:
    from conversations.augment import expand
    from conversations.dataset import write_dataset
    from conversations.records import load_records

    train, _ = load_records(DATA / "train.jsonl")
    base = folder / "base5k.jsonl"
    write_dataset(train[:5000], base)
    sources = []
    for name, n, seed in (("train", 120_000, 7), ("test", 60_000, 7), ("train", 80_000, 8)):
        pairs, _ = load_records(DATA / f"{name}.jsonl")
        grown, _ = expand(pairs, n, seed=seed)
        path = folder / f"{name}_{n // 1000}k_seed{seed}.jsonl"
        write_dataset(grown, path)
        sources.append(path)
    return base, sources


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not (DATA / "train.jsonl").is_file():
        sys.exit(f"{DATA} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    results: dict[str, dict[str, list[float]]] = {"expand": {"s": [], "mb": []}, "build-super": {"s": [], "mb": []}}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        folder = Path(tmp)
        base, sources = make_inputs(folder)
        for i in range(a.repeats):
            env = {**os.environ, "BUCKETCHAT_HOME": str(folder / f"home{i}")}
            s, mb, _ = timed(
                [str(BIN / "bucketchat"), "expand", "--input", str(base), "--output", str(folder / f"exp{i}.jsonl"), "--target", "120000"],
                env,
            )
            results["expand"]["s"].append(s)
            results["expand"]["mb"].append(mb)
            s, mb, out = timed(
                [str(BIN / "bucketchat"), "build-super", "--inputs", *map(str, sources), "--output", str(folder / f"super{i}.jsonl")], env
            )
            results["build-super"]["s"].append(s)
            results["build-super"]["mb"].append(mb)
            print(
                f"run {i + 1}: expand {results['expand']['s'][-1]:.1f} s / {results['expand']['mb'][-1]:.0f} MB; build-super {s:.1f} s / {mb:.0f} MB",
                flush=True,
            )
        report = json.loads((folder / "super0.report.json").read_text())
    print(
        "\nexpand 5,000 -> 120,000:         time "
        + summary(results["expand"]["s"])
        + " s; peak RSS "
        + summary(results["expand"]["mb"])
        + " MB"
    )
    print(
        "build-super 3 inputs, 260,000:  time "
        + summary(results["build-super"]["s"])
        + " s; peak RSS "
        + summary(results["build-super"]["mb"])
        + " MB"
    )
    print("build-super drop report: " + json.dumps({k: report[k] for k in ("kept", "dropped", "malformed_lines")}))
    if a.json:
        a.json.write_text(json.dumps({"results": results, "report": report}, indent=2))


if __name__ == "__main__":
    main()
