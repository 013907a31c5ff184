"""`db build` of N new rows in one process against a local Dask cluster of one and two worker
processes (`--dask_workers`), interleaved, each from an empty embedding cache.

    python tests/bench/dask_embed.py [--rows 20000] [--repeats 1] [--json OUT]

rows/s is the rows embedded over the command's whole wall time (reading, embedding, the table
write and its indices, and for Dask the cluster's start), as a user waits for it. The ratio is
against the single-process build of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "banking77"
WORK = ROOT / ".bucketchat" / "bench-dask"
BIN = Path(sys.executable).parent
SETUPS = {"one process": [], "Dask, 1 worker": ["--dask_workers", "1"], "Dask, 2 workers": ["--dask_workers", "2"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    env = {**os.environ, "BUCKETCHAT_HOME": str(WORK / "home")}
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / f"rows-{a.rows}.jsonl"
    if not data.is_file():
        cmd = [BIN / "bucketchat", "expand", "--input", DATA / "train.jsonl", "--output", data, "--target", str(a.rows)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    results: dict[str, list[dict]] = {name: [] for name in SETUPS}
    for r in range(a.repeats):
        for name, flags in SETUPS.items():
            db = WORK / "db"
            shutil.rmtree(db, ignore_errors=True)
            start = time.perf_counter()
            done = subprocess.run(
                [BIN / "bucketchat", "db", "build", "--data", data, "--db", db, *flags], env=env, capture_output=True, text=True
            )
            wall = time.perf_counter() - start
            if done.returncode:
                sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
            rows = int(re.search(r"(\d+) newly embedded", done.stdout).group(1))
            results[name].append({"wall_s": wall, "rows": rows, "rows_per_s": rows / wall})
            print(f"repeat {r + 1}, {name}: {wall:.1f} s, {rows / wall:.0f} rows/s", flush=True)
    base = statistics.median(x["rows_per_s"] for x in results["one process"])
    print(f"\n{a.rows:,} new rows, medians of {a.repeats}:")
    for name, runs in results.items():
        rate = statistics.median(x["rows_per_s"] for x in runs)
        print(f"  {name:<16} {statistics.median(x['wall_s'] for x in runs):>7.1f} s  {rate:>6.0f} rows/s  {rate / base:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
