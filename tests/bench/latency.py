"""Chat turn latency with a 100k-row table, against a plain SQLite FTS5 + numpy cosine bot over the
same rows, measured in the same process on the same questions (interleaved, so both see the same
machine load); and where the engine's time goes.

    python tests/bench/latency.py [--rows 100000] [--questions 1000] [--json OUT]

Artifacts are kept under .bucketchat/bench-latency/ (git-ignored) and reused by later runs:
  big.jsonl   BANKING77 train grown to --rows pairs by `bucketchat expand` (synthetic variants)
  big.db      `bucketchat db build` of it (LanceDB: native FTS, bitmap on bucket, IVF_RQ vectors)
  model/      `bucketchat finetune` on BANKING77 train itself (the head a user would serve)
The first run embeds --rows messages (minutes); later runs start at the measurement.

Measured per question (BANKING77 test lines):
  engine           `ChatEngine.answer` as `bucketchat chat` runs it: the model's own table; every
                   response is a learned candidate there, so no search is needed and none is made
  engine+search    the same with `--llm_db big.db`: hybrid search (BM25 + vector, RRF) on every turn,
                   in memory over the pinned version (retrieval/search.py)
  partial          a head trained on big.db that learns only 4 responses per bucket (the rest are
                   reached through its pinned 100k-row table): the table is searched only when a
                   bucket's "other" slot could beat the best learned response
  baseline         embed with the same encoder, SQLite FTS5 bm25 top-k + numpy cosine top-k over the
                   100k x 384 matrix, RRF, answer with the best row's response
Components (engine+search): encoder, head, hybrid search, and the rest (selection) by subtraction;
and, for reference, the same search through LanceDB's own hybrid query (what the engine used before).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77"
WORK = ROOT / ".bucketchat" / "bench-latency"
BIN = Path(sys.executable).parent


def prepare(rows: int) -> dict:
    """Build (or reuse) the big table and the model; returns their paths."""
    env = {**os.environ, "BUCKETCHAT_HOME": str(WORK / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}"}
    WORK.mkdir(parents=True, exist_ok=True)
    big, db = WORK / "big.jsonl", WORK / "big.db"
    model = WORK / "model"
    if not big.is_file():
        subprocess.run(
            [BIN / "bucketchat", "expand", "--input", str(DATA / "train.jsonl"), "--output", str(big), "--target", str(rows)],
            env=env,
            check=True,
        )
    if not (db / "conversations.lance").is_dir():
        subprocess.run([BIN / "bucketchat", "db", "build", "--data", str(big), "--db", str(db)], env=env, check=True)
    if not (model / "head.safetensors").is_file():
        model.mkdir(exist_ok=True)
        subprocess.run(
            [
                BIN / "bucketchat",
                "finetune",
                "--data",
                str(DATA / "train.jsonl"),
                "--db",
                str(model / "llm_chat.db"),
                "--output",
                str(model / "head.safetensors"),
                "--meta",
                str(model / "meta.json"),
            ],
            env=env,
            check=True,
        )
    partial = WORK / "model_partial"
    if not (partial / "head.safetensors").is_file():
        # A head that learns 4 responses per bucket; the rest are only reachable through the table.
        partial.mkdir(exist_ok=True)
        subprocess.run(
            [
                BIN / "bucketchat",
                "finetune",
                "--db",
                str(db),
                "--max_candidates_per_bucket",
                "4",
                "--epochs",
                "5",
                "--output",
                str(partial / "head.safetensors"),
                "--meta",
                str(partial / "meta.json"),
            ],
            env=env,
            check=True,
        )
    return {
        "db": str(db),
        "weights": str(model / "head.safetensors"),
        "meta": str(model / "meta.json"),
        "partial_weights": str(partial / "head.safetensors"),
        "partial_meta": str(partial / "meta.json"),
    }


class Baseline:
    """The simple bot a user might write instead: SQLite FTS5 (bm25) + numpy cosine, fused by RRF."""

    def __init__(self, db: str, k: int = 20):
        from retrieval.store import open_table

        data = open_table(db, "conversations").to_arrow().select(["user", "assistant", "vector"])
        self.users, self.responses = data["user"].to_pylist(), data["assistant"].to_pylist()
        self.matrix = data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), -1).astype(np.float32)
        self.k = k
        self.sql = sqlite3.connect(":memory:", check_same_thread=False)
        self.sql.execute("CREATE VIRTUAL TABLE rows USING fts5(user)")
        self.sql.executemany("INSERT INTO rows(rowid, user) VALUES (?, ?)", enumerate(self.users))
        self.sql.commit()

    def answer(self, message: str, vec: np.ndarray) -> str:
        terms = " OR ".join(f'"{w}"' for w in "".join(c if c.isalnum() else " " for c in message.lower()).split())
        fts = (
            [r[0] for r in self.sql.execute("SELECT rowid FROM rows WHERE rows MATCH ? ORDER BY bm25(rows) LIMIT ?", (terms, self.k))]
            if terms
            else []
        )
        sims = self.matrix @ vec  # (N,)
        dense = np.argpartition(-sims, self.k)[: self.k]
        dense = dense[np.argsort(-sims[dense])]
        fused: dict[int, float] = {}
        for ranking in (fts, dense.tolist()):
            for rank, i in enumerate(ranking):
                fused[i] = fused.get(i, 0.0) + 1.0 / (60 + rank)
        return self.responses[max(fused, key=fused.get)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--engines_only",
        action="store_true",
        help="time the three engines alone (no baseline or components between turns, whose 100k x 384 scans evict the caches the engines use)",
    )
    a = p.parse_args()
    if not (DATA / "train.jsonl").is_file():
        sys.exit("this benchmark needs ../shared/data/banking77 beside the checkout")
    paths = prepare(a.rows)

    import torch

    from retrieval.answer import ChatEngine, ChatOptions
    from retrieval.encoder import embed
    from retrieval.store import hybrid_search, open_table

    tests = [json.loads(l) for l in (DATA / "test.jsonl").read_text().splitlines() if l.strip()]
    tests = [t for t in tests if "user" in t][: a.questions]
    engine = ChatEngine(paths["weights"], paths["meta"])
    searching = ChatEngine(paths["weights"], paths["meta"], ChatOptions(llm_db=paths["db"]))
    partial = ChatEngine(paths["partial_weights"], paths["partial_meta"])
    lance_table = open_table(paths["db"], "conversations")
    rows = lance_table.count_rows()
    t0 = time.perf_counter()
    base = Baseline(paths["db"])
    print(
        f"table {rows:,} rows; baseline SQLite FTS5 + numpy index built in {time.perf_counter() - t0:.1f} s; {len(tests)} questions",
        flush=True,
    )
    torch.set_num_threads(1)
    for t in tests[:20]:  # warm-up: caches, lazy index loads
        engine.answer(t["user"]), searching.answer(t["user"]), partial.answer(t["user"]), base.answer(t["user"], embed([t["user"]])[0])

    print(
        f"search index (saved beside the version, memory-mapped): built in {searching.index.stats.build_s:.1f} s, {searching.index.stats.bytes / 2**20:.0f} MiB, {searching.index.stats.cells} cells, {searching.index.stats.nprobe} probed",
        flush=True,
    )
    lat = {
        "engine": [],
        "engine+search": [],
        "partial": [],
        "baseline": [],
        "encoder": [],
        "head": [],
        "hybrid search": [],
        "LanceDB hybrid": [],
    }
    right = {"engine": 0, "engine+search": 0, "partial": 0, "baseline": 0}
    searched = 0
    for t in tests:
        q = t["user"]
        for name, eng in (("engine", engine), ("engine+search", searching), ("partial", partial)):
            s = time.perf_counter()
            ans = eng.answer(q)
            lat[name].append((time.perf_counter() - s) * 1000)
            right[name] += ans.response == t["assistant"]
        searched += ans.searched
        if a.engines_only:
            continue
        s = time.perf_counter()
        vec = embed([q])[0]
        resp = base.answer(q, vec)
        lat["baseline"].append((time.perf_counter() - s) * 1000)
        right["baseline"] += resp == t["assistant"]
        # components of engine+search, timed alone
        s = time.perf_counter()
        vec = embed([q])[0]
        lat["encoder"].append((time.perf_counter() - s) * 1000)
        s = time.perf_counter()
        with torch.no_grad():
            searching.head.response_log_probs(torch.from_numpy(vec[None]), searching.head.lex([q]))
        lat["head"].append((time.perf_counter() - s) * 1000)
        s = time.perf_counter()
        searching.index.search(vec, q, searching.opts.db_top_k)
        lat["hybrid search"].append((time.perf_counter() - s) * 1000)
        s = time.perf_counter()
        hybrid_search(lance_table, vec, q, searching.opts.db_top_k)
        lat["LanceDB hybrid"].append((time.perf_counter() - s) * 1000)

    report = {"rows": rows, "questions": len(tests), "latency_ms": {}, "accuracy": {k: v / len(tests) for k, v in right.items()}}
    print(f"\nper chat turn over {len(tests)} BANKING77 test questions, {rows:,}-row table (ms):")
    b50, b99 = (pct(lat["baseline"], 50), pct(lat["baseline"], 99)) if lat["baseline"] else (math.nan, math.nan)
    for name, values in lat.items():
        if not values:
            continue
        row = {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "mean": statistics.fmean(values)}
        report["latency_ms"][name] = row
        ratio = (
            f"   p50 {row['p50'] / b50:.2f}x, p99 {row['p99'] / b99:.2f}x baseline"
            if name in right and name != "baseline" and lat["baseline"]
            else ""
        )
        acc = f"   accuracy {right[name] / len(tests):.2%}" if name in right else ""
        print(f"  {name:<14} p50 {row['p50']:6.2f}  p90 {row['p90']:6.2f}  p99 {row['p99']:6.2f}  mean {row['mean']:6.2f}{ratio}{acc}")
    report["partial_searched"] = searched / len(tests)
    print(f"  partial: the table was searched on {searched / len(tests):.1%} of turns (elsewhere no retrieved row could win)")
    if a.engines_only:
        return
    rest = statistics.median(lat["engine+search"]) - sum(statistics.median(lat[k]) for k in ("encoder", "head", "hybrid search"))
    print(
        f"  where engine+search's median turn goes: encoder {statistics.median(lat['encoder']):.2f}, head {statistics.median(lat['head']):.2f}, hybrid search {statistics.median(lat['hybrid search']):.2f}, selection and the rest {rest:.2f}"
    )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
