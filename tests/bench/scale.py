"""A table of N rows (1M by default): what `db build` costs in time and memory, fresh, unchanged and
after editing one line, and what chat costs against it (start, turn latency, memory).

    python tests/bench/scale.py [--rows 1000000] [--questions 300] [--epochs 2] [--skip PHASE ...] [--json OUT]

Everything is kept under .bucketchat/bench-scale/ (git-ignored) and reused by later runs:
  rows-N.jsonl   BANKING77 train cycled to N distinct messages (deterministic edits: `make_rows`)
  db-N/          `bucketchat db build` of it; its embedding cache is kept between runs, so a later
                 "fresh" build is a fresh table from cached vectors (the first run embeds N rows)
  model/         `bucketchat finetune` on BANKING77 train: the head chat serves with `--llm_db db-N`
Measured, each command in its own process (GNU time's peak RSS):
  build          a new table from the data (the first run: embedding every row; later: cache hits)
  unchanged      the same command again: nothing embedded, no version written
  one edit       the data with one message changed: one row embedded, a new version and its index
  chat           `bucketchat chat --llm_db db-N --json` on --questions BANKING77 test questions:
                 spawn to first answer, turn p50/p99 (the engine's own latency_ms), the encoder's
                 and the head's own time on the same questions (in this process, one thread, as
                 chat runs them: the rest of a turn is the table's search), and the chat process's peak
                 private (anonymous) and file-backed RSS, sampled every 50 ms; the search index is
                 memory-mapped, so its pages are file-backed and shared between processes.
  finetune       `bucketchat finetune --db db-N --epochs E --force` (2 by default) on the whole table: wall
                 time, the training's examples/s, and peak private and file-backed RSS sampled as
                 for chat (the vectors are read into a memory map, so they count as file-backed).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77"
WORK = ROOT / ".bucketchat" / "bench-scale"
BIN = Path(sys.executable).parent


def make_rows(path: Path, rows: int) -> None:
    """BANKING77 train cycled to ``rows`` messages, distinct but for its own few repeats: the k-th pass appends
    " (case k)". Not `bucketchat expand`: past ~200k rows of these 10k messages most of its draws
    are duplicates and each is slow; 1M did not finish in 50 minutes (BENCHMARKS.md)."""
    train = [json.loads(l) for l in (DATA / "train.jsonl").read_text().splitlines() if l.strip()]
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as out:
        for i in range(rows):
            rec, k = dict(train[i % len(train)]), i // len(train)
            if k:
                rec["user"] = f"{rec['user']} (case {k})"
            out.write(json.dumps(rec) + "\n")
    path.with_suffix(".tmp").rename(path)


def env() -> dict:
    return {**os.environ, "BUCKETCHAT_HOME": str(WORK / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}"}


def timed(cmd: list[str]) -> dict:
    """Wall time, peak RSS (GNU time) and stdout of one command."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *map(str, cmd)], env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{cmd[1]} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    rss = int(re.findall(r"maxrss_kb=(\d+)", done.stderr)[-1])
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(rss / 2**20, 2), "stdout": done.stdout}


def embedded(out: str) -> int:
    return int(re.search(r"(\d+) newly embedded", out).group(1))


def build(data: Path, db: Path, label: str, fresh: bool = False) -> dict:
    if fresh:  # a new table; the embedding cache stays (the first run fills it)
        for p in db.glob("*"):
            if p.name != "_embedding_cache":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    r = timed([BIN / "bucketchat", "db", "build", "--data", data, "--db", db])
    r["embedded"] = embedded(r.pop("stdout"))
    print(f"  {label:<10} {r['wall_s']:>8.1f} s  peak {r['peak_rss_gb']:.2f} GB  {r['embedded']:,} rows embedded", flush=True)
    return {label: r}


def status(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of a process."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+)", text).group(1)), int(re.search(r"RssFile:\s+(\d+)", text).group(1))


class Peaks:
    """Peak (anonymous, file-backed) RSS of a running process, sampled every 50 ms on a thread."""

    def __init__(self, pid: int):
        self.pid, self.kb, self._stop = pid, [0, 0], threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                anon, file = status(self.pid)
            except (OSError, AttributeError):
                return
            self.kb = [max(self.kb[0], anon), max(self.kb[1], file)]
            time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        return {"peak_private_rss_gb": round(self.kb[0] / 2**20, 2), "peak_file_rss_gb": round(self.kb[1] / 2**20, 2)}


def finetune(db: Path, epochs: int) -> dict:
    out = WORK / "scale-head"
    out.mkdir(exist_ok=True)
    cmd = [
        BIN / "bucketchat",
        "finetune",
        "--db",
        db,
        "--epochs",
        epochs,
        "--output",
        out / "head.safetensors",
        "--meta",
        out / "meta.json",
        "--force",  # train even when an earlier run trained this table with these settings
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(list(map(str, cmd)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = Peaks(proc.pid)
    text = proc.communicate()[0]
    r = {"wall_s": round(time.perf_counter() - start, 1), **peaks.stop(), "epochs": epochs}
    if proc.returncode:
        sys.exit(f"finetune failed:\n{text[-3000:]}")
    speed = re.search(r"([\d,]+) examples/s", text)
    r["examples_per_s"] = int(speed.group(1).replace(",", "")) if speed else None
    meta = json.loads((out / "meta.json").read_text())
    r["val_rows"] = meta["validation"]["rows"]
    print(
        f"  finetune   {r['wall_s']:>8.1f} s  {r['examples_per_s'] or 0:,} examples/s  peak RSS private {r['peak_private_rss_gb']:.2f} GB, "
        f"file-backed {r['peak_file_rss_gb']:.2f} GB; {r['val_rows']:,} validation rows",
        flush=True,
    )
    return r


def chat(db: Path, model: Path, questions: list[str]) -> dict:
    cmd = [BIN / "bucketchat", "chat", "--weights", model / "head.safetensors", "--meta", model / "meta.json", "--llm_db", db, "--json"]
    cmd += ["--no_log"]
    start = time.perf_counter()
    proc = subprocess.Popen(list(map(str, cmd)), env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    peaks = Peaks(proc.pid)
    proc.stdin.write(questions[0] + "\n")
    proc.stdin.flush()
    first = json.loads(proc.stdout.readline())
    first_s = time.perf_counter() - start
    proc.stdin.write("".join(q + "\n" for q in questions[1:]))
    proc.stdin.close()
    answers = [first] + [json.loads(l) for l in proc.stdout]
    proc.wait()
    rss = peaks.stop()
    lat = sorted(a["latency_ms"] for a in answers[1:])
    return {
        "first_answer_s": round(first_s, 2),
        "turn_p50_ms": round(statistics.median(lat), 2),
        "turn_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2),
        **rss,
    }


def parts_ms(model: Path, questions: list[str]) -> dict:
    """The encoder's and the head's own p50 on ``questions``, in this process with one thread as chat
    runs them: what a turn costs before it reads the table."""
    import torch
    from threadpoolctl import threadpool_limits

    from models import checkpoint
    from retrieval.encoder import ENCODER_ID, embed

    torch.set_num_threads(1)
    threadpool_limits(1, "blas")
    head, _ = checkpoint.load(model / "head.safetensors", model / "meta.json")
    embed(["warm-up"], encoder_id=ENCODER_ID)
    enc, hd = [], []
    with torch.no_grad():
        for q in questions:
            t = time.perf_counter()
            vec = embed([q], encoder_id=ENCODER_ID)
            t1 = time.perf_counter()
            head.response_log_probs(torch.from_numpy(vec), head.lex([q]))
            enc.append((t1 - t) * 1000)
            hd.append((time.perf_counter() - t1) * 1000)
    return {"encoder_p50_ms": round(statistics.median(enc), 2), "head_p50_ms": round(statistics.median(hd), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2, help="finetune's epochs on the N-row table (default 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=["build", "chat", "finetune"], help="phases not to run")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    WORK.mkdir(parents=True, exist_ok=True)
    data, db, model = WORK / f"rows-{a.rows}.jsonl", WORK / f"db-{a.rows}", WORK / "model"
    if not data.is_file():
        make_rows(data, a.rows)
    if not (model / "head.safetensors").is_file():
        model.mkdir(exist_ok=True)
        cmd = [BIN / "bucketchat", "finetune", "--data", DATA / "train.jsonl", "--db", model / "llm_chat.db"]
        subprocess.run([*cmd, "--output", model / "head.safetensors", "--meta", model / "meta.json"], env=env(), check=True)
    report: dict = {"rows": a.rows}
    if "build" not in a.skip:
        print(f"db build, {a.rows:,} rows:", flush=True)
        report |= build(data, db, "build", fresh=True)
        report |= build(data, db, "unchanged")
        edited = WORK / f"rows-{a.rows}-edited.jsonl"
        with open(data, encoding="utf-8") as src, open(edited, "w", encoding="utf-8") as out:
            for i, line in enumerate(src):
                if i == a.rows // 2:
                    rec = json.loads(line)
                    rec["user"] += " (edited for the benchmark)"
                    line = json.dumps(rec) + "\n"
                out.write(line)
        report |= build(edited, db, "one edit")
    if "chat" not in a.skip:
        questions = [json.loads(l)["user"] for l in (DATA / "test.jsonl").read_text().splitlines()[: a.questions]]
        report["chat"] = chat(db, model, questions)
        report["chat"] |= parts_ms(model, questions)
        c = report["chat"]
        print(
            f"chat --llm_db: first answer {c['first_answer_s']} s; turn p50 {c['turn_p50_ms']} ms (encoder alone {c['encoder_p50_ms']} ms, "
            f"{c['turn_p50_ms'] / c['encoder_p50_ms']:.2f}x; head alone {c['head_p50_ms']} ms), p99 {c['turn_p99_ms']} ms; peak RSS private {c['peak_private_rss_gb']} GB, "
            f"file-backed {c['peak_file_rss_gb']} GB",
            flush=True,
        )
    if "finetune" not in a.skip:
        report["finetune"] = finetune(db, a.epochs)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
