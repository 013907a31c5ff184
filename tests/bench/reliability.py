"""Reliability through the commands a user runs: hostile text into every entry point, and signals
into every long-running command, counting crashes, lost lines and leftover processes.

    python tests/bench/reliability.py [--lines 2000] [--seed 0] [--json OUT]

Entry points (seeded, so a run is repeatable), each in its own process:

- pipeline: `bucketchat pipeline` on the bundled sample with hostile lines mixed in; kept + rejected
  must equal the lines read, and the run must still train a champion;
- piped chat: `bucketchat chat --json` on hostile lines; every non-blank line must come back once,
  with a response or an error;
- server: `bucketchat serve`, hostile request bodies (JSON with any Unicode, and raw bytes); no 500,
  no dropped connection.

Signals: SIGINT, SIGTERM and SIGKILL to pipeline, finetune and size-sweep mid-run, SIGINT and
SIGTERM to chat and serve. Each must end within 2 s (exit 128+N, one line, no traceback; a SIGKILL
ends at once), leave no process of its own running (checked by pid; the local Prefect API that
commands share is not the command's, and stops itself when idle), and after a SIGKILL the next
command must mark the dead command's flow runs Crashed (read from Prefect's own database).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "conversation_data.sample.jsonl"
TROUBLE = [
    "\ud800",
    "\udfff",
    "\x00",
    "\ufeff",
    "\r\n",
    "\r",
    "\x1b",
    "\x85",
    "\u2028",
    "é",
    "😀",
    " ",
    "\t",
    "where is my parcel",
    "{",
    '"',
    "\\",
]


def hostile_text(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return "".join(rng.choice(TROUBLE) for _ in range(rng.randrange(1, 8)))
    if kind == 1:
        return "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randrange(1, 40)))
    return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40)))


def hostile_line(rng: random.Random) -> bytes:
    """One line of a file or of piped input (no newline in it)."""
    kind = rng.randrange(7)
    if kind == 0:  # a record whose text is anything, lone surrogates as JSON escapes
        line = json.dumps({"user": hostile_text(rng), "assistant": hostile_text(rng)}).encode()
    elif kind == 1:  # the same, non-ASCII written raw (a lone surrogate then is not UTF-8)
        line = json.dumps({"user": hostile_text(rng), "assistant": hostile_text(rng)}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    elif kind == 2:
        line = rng.randbytes(rng.randrange(1, 80))
    elif kind == 3:  # another encoding
        line = json.dumps({"user": "café " + hostile_text(rng), "assistant": "crème"}, ensure_ascii=False).encode("latin-1", "replace")
    elif kind == 4:
        line = b"\xef\xbb\xbf" + json.dumps({"user": hostile_text(rng), "assistant": "ok"}).encode() + b"\r"
    elif kind == 5:
        line = hostile_text(rng).encode("utf-8", "surrogatepass")
    else:
        line = b"x" * rng.choice([17_000, 2 << 20])  # over the chat limit, over the file limit
    return line.replace(b"\n", b" ")


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "interfaces.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def running(pid: int) -> bool:
    s = _stat(pid)
    return s is not None and s[0] != "Z"


def descendants(pid: int) -> set[int]:
    kids = {int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or [None, None])[1] == str(pid)}
    return kids.union(*(descendants(k) for k in kids)) if kids else set()


def leftover(pids: set[int], within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.1)
    return sum(map(running, pids))


def blank(raw: bytes) -> bool:
    """A line every entry point skips: valid UTF-8 holding only whitespace (and a leading BOM)."""
    try:
        return not raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return False


def fuzz_pipeline(work: Path, env: dict, rng: random.Random, n: int) -> dict:
    from conversations.records import Pair, iter_records

    lines = SAMPLE.read_bytes().splitlines() + [hostile_line(rng) for _ in range(n)]
    rng.shuffle(lines)
    data = work / "hostile.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    done = subprocess.run(
        cmd("pipeline", "--data", str(data), "--workdir", str(work / "pipeline")), env=env, cwd=work, capture_output=True, text=True
    )
    crashed = done.returncode != 0 or "Traceback" in done.stderr
    if crashed:
        return {"inputs": len(lines), "hostile": n, "crashes": 1, "lost": None, "stderr_tail": done.stderr[-500:]}
    # Every non-blank line gave pairs or a reject (read again here with the loader), and the
    # pipeline's report agrees: the same pairs and rejects, and kept + dropped = pairs.
    pair_lines, reject_lines, pairs = set(), set(), 0
    for item in iter_records(data):
        if isinstance(item, Pair):
            pair_lines.add(item.line)
            pairs += 1
        else:
            reject_lines.add(item.line)
    nonblank = {i for i, raw in enumerate(lines, start=1) if not blank(raw)}
    report = json.loads((work / "pipeline" / "dataset.report.json").read_text())
    src = report["sources"][str(data)]
    lost = (
        len(nonblank - pair_lines - reject_lines)
        + abs(src["pairs"] - pairs)
        + abs(src["malformed"] - len(reject_lines))
        + abs(report["kept"] + report["dropped_total"] - pairs)
    )
    return {
        "inputs": len(lines),
        "hostile": n,
        "crashes": 0,
        "lost": lost,
        "kept_pairs": report["kept"],
        "rejected_lines": len(reject_lines),
        "dropped_pairs": report["dropped_total"],
    }


def fuzz_chat(work: Path, env: dict, rng: random.Random, n: int) -> dict:
    lines = [hostile_line(rng) for _ in range(n)]
    done = subprocess.run(cmd("chat", "--json"), input=b"\n".join(lines) + b"\n", env=env, cwd=work, capture_output=True)
    rows = [json.loads(l) for l in done.stdout.decode("utf-8").split("\n") if l]
    expected = [i for i, raw in enumerate(lines, start=1) if not blank(raw)]
    answered = [r["line"] for r in rows if ("response" in r) != ("error" in r)]
    return {
        "inputs": n,
        "crashes": int(done.returncode != 0 or b"Traceback" in done.stderr),
        "lost": len(set(expected) - set(answered)) + abs(len(answered) - len(expected)),
        "answered": sum("response" in r for r in rows),
        "reported": sum("error" in r for r in rows),
    }


def fuzz_server(work: Path, env: dict, rng: random.Random, n: int) -> dict:
    port = free_port()
    proc = subprocess.Popen(cmd("serve", "--port", str(port)), env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        statuses: dict[int, int] = {}
        errors = 0
        with httpx.Client(timeout=30) as client:
            for i in range(n):
                if i % 3 == 2:
                    body = rng.randbytes(rng.randrange(0, 200))
                else:
                    msgs = [
                        {
                            "role": rng.choice(["user", "assistant", "system", "bot"]),
                            "content": hostile_text(rng) if rng.random() < 0.9 else rng.choice([None, 3, [], {"x": 1}]),
                        }
                        for _ in range(rng.randrange(1, 4))
                    ]
                    body = json.dumps({"messages": msgs, **({"stream": True} if rng.random() < 0.2 else {})}).encode()
                try:
                    status = client.post(url, content=body, headers={"content-type": "application/json"}).status_code
                    statuses[status] = statuses.get(status, 0) + 1
                except httpx.HTTPError:
                    errors += 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return {
        "inputs": n,
        "crashes": statuses.get(500, 0) + errors,
        "lost": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def prefect_states(home: Path, pid: int) -> list[str]:
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        return sorted(s for s, tags in db.execute("select state_type, tags from flow_run") if f":{pid}:" in tags)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def shared_api(home: Path) -> int | None:
    """The pid of the local Prefect API the commands share (flows/local_api.py), while one runs."""
    try:
        return json.loads((home / "prefect" / "api" / "api.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def try_signal(name: str, args: list[str], sig: int, env: dict, work: Path, home: Path, ready) -> dict:
    """Start a command, wait until ``ready(proc)`` says it is mid-work, send ``sig``, and check."""
    proc = subprocess.Popen(cmd(*args), env=env, cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not ready(proc):
        proc.kill()
        return {
            "command": name,
            "signal": signal.Signals(sig).name,
            "ok": False,
            "why": "never got mid-run: " + proc.stderr.read().decode()[-300:],
        }
    helpers = descendants(proc.pid) - {shared_api(home)}
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    err = err.decode(errors="replace")
    left = leftover(helpers)
    row = {
        "command": name,
        "signal": signal.Signals(sig).name,
        "stop_s": round(took, 2),
        "exit": proc.returncode,
        "traceback": "Traceback" in err,
        "leftover_processes": left,
    }
    if sig == signal.SIGKILL:
        subprocess.run(
            cmd("expand", "--input", str(SAMPLE), "--output", str(work / "after-kill.jsonl"), "--target", "450"),
            env=env,
            cwd=work,
            capture_output=True,
        )
        row["flow_runs_after_next_command"] = prefect_states(home, proc.pid)
        row["ok"] = left == 0 and "RUNNING" not in row["flow_runs_after_next_command"]
    else:
        lines = [l for l in err.splitlines() if l.strip()]
        row["ok"] = took < 2.0 and proc.returncode == 128 + sig and not row["traceback"] and len(lines) == 1 and left == 0
        if name in ("pipeline", "finetune", "size-sweep"):
            row["flow_runs"] = prefect_states(home, proc.pid)
            row["ok"] = row["ok"] and "RUNNING" not in row["flow_runs"]
    if not row["ok"]:
        row["why"] = err[-600:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=2000, help="hostile inputs per entry point (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rng = random.Random(a.seed)
    home = Path(tempfile.mkdtemp(prefix="bucketchat-reliability-"))
    work = home / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BUCKETCHAT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    env.pop("PREFECT_API_URL", None)

    fuzz = {}
    for name, fn, n in (
        ("pipeline (file)", fuzz_pipeline, max(50, a.lines // 4)),
        ("chat (piped)", fuzz_chat, a.lines),
        ("serve (HTTP)", fuzz_server, a.lines),
    ):
        t0 = time.perf_counter()
        fuzz[name] = {**fn(work, env, rng, n), "s": round(time.perf_counter() - t0, 1)}
        print(name, fuzz[name], flush=True)

    db = work / "pipeline" / "llm_chat.db"
    port = free_port()

    def after(path: Path, delay: float = 3.0):
        return lambda proc: wait_for(path, proc) and (time.sleep(delay) or proc.poll() is None)

    def chatting(proc) -> bool:
        proc.stdin.write(b"where is my parcel\n")
        proc.stdin.flush()
        return bool(proc.stdout.readline())

    def serving(proc) -> bool:
        return b"serving" in proc.stdout.readline()

    plans = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        w = work / f"run-{sig.name}"
        plans.append(
            ("pipeline", ["pipeline", "--data", str(SAMPLE), "--workdir", str(w), "--epochs", "400"], sig, after(w / "llm_chat.db"))
        )
        plans.append(
            (
                "finetune",
                [
                    "finetune",
                    "--db",
                    str(db),
                    "--output",
                    str(work / "f.pth"),
                    "--meta",
                    str(work / "f.json"),
                    "--epochs",
                    "400",
                    "--force",
                ],
                sig,
                lambda proc: time.sleep(12) or proc.poll() is None,
            )
        )
        plans.append(
            ("size-sweep", ["size-sweep", "--db", str(db), "--epochs", "400"], sig, lambda proc: time.sleep(12) or proc.poll() is None)
        )
    for sig in (signal.SIGINT, signal.SIGTERM):
        plans.append(("chat", ["chat", "--json"], sig, chatting))
        plans.append(("serve", ["serve", "--port", str(port)], sig, serving))
    signals = []
    for name, args, sig, ready in plans:
        row = try_signal(name, args, sig, env, work, home, ready)
        print(row, flush=True)
        signals.append(row)

    out = {"seed": a.seed, "fuzz": fuzz, "signals": signals}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
