"""`bucketchat serve` of an earlier commit beside this one, interleaved, on the same model and table.

    python tests/bench/serve_sides.py BEFORE_BUCKETCHAT [--repeats 3] [--seconds 10]

BEFORE_BUCKETCHAT is the `bucketchat` of an earlier checkout (e.g. the one `tests/bench/compare.py
REF ...` leaves in .bucketchat/compare/REF/.venv/bin/). Each repeat serves the BANKING77 model and
100k-row table that tests/bench/latency.py leaves, with the earlier code, this code (`--workers
auto`) and this code with `--workers 1`, in turn; 8 keep-alive clients for --seconds each (the
serve.py load generator, on the same cores). Prints medians: req/s, p50, p99, and time to ready.
(serve.py's own --this-script comparison cannot run an earlier tree: it builds its data there.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.latency import DATA, prepare  # noqa: E402
from tests.bench.serve import free_port, hammer  # noqa: E402


def one(cmd: list[str], paths: dict, bodies: list[dict], seconds: float) -> tuple[float, float, float, float]:
    port = free_port()
    srv = subprocess.Popen(
        [cmd[0], "serve", "--weights", paths["weights"], "--meta", paths["meta"], "--port", str(port), *cmd[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if srv.poll() is not None or time.monotonic() - t0 > 120:
                    sys.exit(f"{cmd[0]} serve did not start")
                time.sleep(0.05)
        ready = time.monotonic() - t0
        time.sleep(2)  # helpers loading
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        hammer(url, "POST", bodies, 8, 2)  # warm-up
        r = hammer(url, "POST", bodies, 8, seconds)
        if r["errors"]:
            sys.exit(f"{r['errors']} errors: {r['first_errors']}")
        return r["rps"], r["p50_ms"], r["p99_ms"], ready
    finally:
        srv.terminate()
        srv.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="the earlier checkout's bucketchat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    paths = prepare(100_000)
    questions = [json.loads(line)["user"] for line in (DATA / "test.jsonl").read_text().splitlines() if '"user"' in line][:500]
    bodies = [{"model": "bucketchat", "messages": [{"role": "user", "content": q}]} for q in questions]
    this = str(Path(sys.executable).parent / "bucketchat")
    sides = {"before": [a.before], "after (--workers auto)": [this], "after --workers 1": [this, "--workers", "1"]}
    results: dict[str, list] = {name: [] for name in sides}
    for rep in range(a.repeats):
        for name, cmd in sides.items():
            results[name].append(one(cmd, paths, bodies, a.seconds))
            print(f"[{rep + 1}/{a.repeats}] {name}: " + ", ".join(f"{x:.1f}" for x in results[name][-1]), flush=True)
    for name, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"{name}: {med[0]:.0f} req/s, p50 {med[1]:.1f} ms, p99 {med[2]:.1f} ms, ready in {med[3]:.2f} s")


if __name__ == "__main__":
    main()
