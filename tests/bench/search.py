"""The search index of a large table, leg by leg: what each part of a chat turn's search costs, and
how many of the exact nearest rows the inverted file finds, for several probe counts.

    python tests/bench/search.py --db DB [--table conversations] [--questions 300] [--probes 8 16 32] [--json OUT]

DB is any built table (tests/bench/scale.py keeps its 1M-row one in .bucketchat/bench-scale/db-N).
The questions are BANKING77 test lines, embedded once up front. Each probe count is timed on every
question, after one untimed pass that pages the index in (the figures are for a warm page cache):

  nearest       ``SearchIndex.nearest(vec, 10)``: the neighbour vote's rows, no bucket filter
  vector leg    the vector half of ``search`` with a bucket prefilter of 3 buckets
  text leg      the BM25 half of the same search (the same for every probe count)
  search        the whole ``search(vec, text, 10, buckets)``
  turn          what a chat turn searches: ``nearest`` then ``search``, each scanning on its own, and
                with one ``probe(vec)`` scan shared by both (retrieval/answer.py does the latter)
  recall@10     of ``nearest`` and of the filtered vector leg, against an exact scan of every row
                (``retrieval/neighbours.nearest``) with the same filter

The prefilter's 3 buckets per question are those of the exact nearest rows (the first three
distinct), standing in for the head's top labels, so the filter keeps the rows chat would search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77"
K = 10


def timed(fn, args: list) -> tuple[float, list]:
    """(median ms, results) of ``fn(*a)`` over ``args``."""
    times, out = [], []
    for a in args:
        t = time.perf_counter()
        out.append(fn(*a))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def recall(found: list[np.ndarray], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True)
    p.add_argument("--table", default="conversations")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--probes", type=int, nargs="+", default=None, help="probe counts to try (default: the index's own, then 8, 16, 32)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    from threadpoolctl import threadpool_limits

    from retrieval.encoder import embed
    from retrieval.index_files import open_index
    from retrieval.neighbours import nearest
    from retrieval.search import query_terms
    from retrieval.store import open_table

    threadpool_limits(1, "blas")  # as chat runs it (retrieval/answer.py)
    version = open_table(a.db, a.table).version
    t = time.perf_counter()
    index, about = open_index(a.db, a.table, version)
    open_s = time.perf_counter() - t
    texts = [json.loads(line)["user"] for line in (DATA / "test.jsonl").read_text().splitlines()[: a.questions]]
    vecs = embed(texts, encoder_id=about["encoder"])
    stats = index.stats
    print(f"{a.db}: {stats.rows:,} rows, {stats.cells:,} cells, index's own probes {stats.nprobe}; opened in {open_s:.2f} s", flush=True)

    with threadpool_limits(2, "blas"):  # the exact scan is the reference, not a figure: all cores
        _, exact = nearest(vecs, index.vectors, K)
        allowed = []
        for row in exact:
            seen = list(dict.fromkeys(index.buckets[row].tolist()))[:3]
            allowed.append(np.asarray(sorted(seen), np.int64))
        exact_filtered = []
        for q, b in zip(vecs, allowed):
            among = np.isin(index.buckets, b)
            exact_filtered.append(nearest(q[None], index.vectors, K, among=among)[1][0])
    text_ms, hits = timed(index._text_top, [(t, K, b) for t, b in zip(texts, allowed)])
    postings = [
        sum(int(index.post_indptr[j + 1] - index.post_indptr[j]) for j in {index.vocab[w] for w in query_terms(t) if w in index.vocab})
        for t in texts
    ]
    report = {
        "db": str(a.db),
        "rows": stats.rows,
        "cells": stats.cells,
        "open_s": round(open_s, 3),
        "text_leg_ms": round(text_ms, 3),
        "postings_p50": int(statistics.median(postings)),
        "probes": [],
    }
    print(f"  text leg {text_ms:.2f} ms (postings a query, p50 {report['postings_p50']:,})", flush=True)
    own = index.nprobe
    for probes in a.probes or [own, *(x for x in (8, 16, 32) if x != own)]:
        index.nprobe = probes
        for v, b in zip(vecs, allowed):  # page the probed cells in: warm-cache figures
            index.nearest(v, K)
            index._vector_top(v, K, b)
        near_ms, near = timed(index.nearest, [(v, K) for v in vecs])
        leg_ms, leg = timed(index._vector_top, [(v, K, b) for v, b in zip(vecs, allowed)])
        search_ms, _ = timed(index.search, [(v, t, K, b.tolist()) for v, t, b in zip(vecs, texts, allowed)])
        turn = [(v, t, b.tolist()) for v, t, b in zip(vecs, texts, allowed)]
        alone_ms, _ = timed(lambda v, t, b: (index.nearest(v, K), index.search(v, t, K, b)), turn)
        shared_ms, _ = timed(lambda v, t, b: (p := index.probe(v), index.nearest(v, K, p), index.search(v, t, K, b, probe=p)), turn)
        row = {
            "probes": probes,
            "rows_scanned": int(min(probes, stats.cells) * stats.rows / max(stats.cells, 1)),
            "nearest_ms": round(near_ms, 3),
            "nearest_recall": round(recall([pos for _, pos in near], exact), 4),
            "vector_leg_ms": round(leg_ms, 3),
            "vector_leg_recall": round(recall(leg, np.asarray(exact_filtered)), 4),
            "search_ms": round(search_ms, 3),
            "turn_alone_ms": round(alone_ms, 3),
            "turn_one_probe_ms": round(shared_ms, 3),
        }
        report["probes"].append(row)
        print(
            f"  probes {probes:>4} (~{row['rows_scanned']:,} rows): nearest {near_ms:.2f} ms recall@10 {row['nearest_recall']:.4f}; "
            f"vector leg {leg_ms:.2f} ms recall@10 {row['vector_leg_recall']:.4f}; search {search_ms:.2f} ms; "
            f"turn {alone_ms:.2f} ms, with one probe {shared_ms:.2f} ms",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
