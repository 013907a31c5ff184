"""Server throughput on loopback: `bucketchat serve` in its own process, hammered by concurrent
keep-alive clients for a bounded time, with `GET /healthz` (no model work) as the same-run ceiling.

    python tests/bench/serve.py [--clients 8] [--seconds 15] [--repeats 3] [--workers auto] [--json OUT]

Uses the BANKING77 model that tests/bench/latency.py leaves in .bucketchat/bench-latency/model (it
trains one if missing). The load generator runs on the same 2 cores as the server, so the figures
are a floor. Every request must get a 200; anything else is counted and reported as an error.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.latency import DATA, prepare  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hammer(url: str, method: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """``clients`` threads, each with its own keep-alive connection, for ``seconds``."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = i
            while time.monotonic() < stop:
                s = time.perf_counter()
                r = c.post(url, json=bodies[n % len(bodies)]) if method == "POST" else c.get(url)
                ms = (time.perf_counter() - s) * 1000
                with lock:
                    lat.append(ms)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:100]}")
                n += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "rps": len(lat) / wall,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[int(len(lat) * 0.99)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="auto", help="`bucketchat serve --workers` (default auto, as a user gets it)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    paths = prepare(100_000)
    questions = [json.loads(l)["user"] for l in (DATA / "test.jsonl").read_text().splitlines() if l.strip() and '"user"' in l][:500]
    bodies = [{"model": "bucketchat", "messages": [{"role": "user", "content": q}]} for q in questions]
    port = free_port()
    server = subprocess.Popen(
        [BIN / "bucketchat", "serve", "--weights", paths["weights"], "--meta", paths["meta"], "--port", str(port), "--workers", a.workers],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit(f"server did not start: {server.stdout.read() if server.poll() is not None else 'timeout'}")
            time.sleep(0.2)
        hammer(f"{base}/v1/chat/completions", "POST", bodies, a.clients, 2.0)  # warm-up
        runs = {"chat": [], "healthz": []}
        for i in range(a.repeats):
            runs["healthz"].append(hammer(f"{base}/healthz", "GET", [], a.clients, a.seconds / 3))
            runs["chat"].append(hammer(f"{base}/v1/chat/completions", "POST", bodies, a.clients, a.seconds))
            print(
                f"repeat {i + 1}: chat {runs['chat'][-1]['rps']:.0f} req/s ({runs['chat'][-1]['errors']} errors, p50 {runs['chat'][-1]['p50_ms']:.1f} ms, p99 {runs['chat'][-1]['p99_ms']:.1f} ms); healthz {runs['healthz'][-1]['rps']:.0f} req/s",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(10)
    chat = statistics.median(r["rps"] for r in runs["chat"])
    ceiling = statistics.median(r["rps"] for r in runs["healthz"])
    errors = sum(r["errors"] for r in runs["chat"] + runs["healthz"])
    print(
        f"\n{a.clients} keep-alive clients, {a.repeats} x {a.seconds:.0f} s: chat completions median {chat:.0f} req/s (min {min(r['rps'] for r in runs['chat']):.0f}, max {max(r['rps'] for r in runs['chat']):.0f}), "
        f"{chat / ceiling:.2f}x the /healthz ceiling of {ceiling:.0f} req/s; p50 {statistics.median(r['p50_ms'] for r in runs['chat']):.1f} ms, p99 {statistics.median(r['p99_ms'] for r in runs['chat']):.1f} ms; errors: {errors}"
    )
    if a.json:
        a.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
