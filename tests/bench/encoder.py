"""The int8 ONNX encoder against the torch fp32 form of the same weights, in one process.

    python tests/bench/encoder.py [--queries 500] [--rows 2000] [--repeats 3]

Reports, on BANKING77 messages:
  per query     one message at a time, one thread each (a chat turn's encoder), interleaved, p50/p99
  table rows/s  int8: every text alone on threads (what `db build` does); fp32: sentence-transformers
                batches of 64; median of --repeats
  agreement     cosine of int8 to fp32 (mean, min), and of int8 run in padded batches of 64 to int8
                alone: why each text is embedded alone (a batched vector depends on its batch-mates)
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


def batched_int8(texts: list[str], batch: int = 64) -> np.ndarray:
    """int8 vectors computed the way a batching embedder would: padded batches in one run each."""
    from retrieval.encoder import load_int8

    session, tok, *_ = load_int8()
    out = []
    for i in range(0, len(texts), batch):
        enc = [tok.encode(t) for t in texts[i : i + batch]]
        width = max(len(e.ids) for e in enc)
        ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in enc], dtype=np.int64)
        mask = (np.arange(width)[None, :] < np.array([len(e.ids) for e in enc])[:, None]).astype(np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        v = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import torch

    from retrieval.encoder import INT8_ID, TORCH_ID, embed

    queries = [json.loads(l)["user"] for l in (DATA / "test.jsonl").read_text().splitlines() if '"user"' in l][: a.queries]
    rows = [json.loads(l)["user"] for l in (DATA / "train.jsonl").read_text().splitlines() if '"user"' in l][: a.rows]
    embed(queries[:5], encoder_id=INT8_ID), embed(queries[:5], encoder_id=TORCH_ID)  # load both

    torch.set_num_threads(1)
    lat: dict[str, list[float]] = {INT8_ID: [], TORCH_ID: []}
    for q in queries:
        for enc in lat:
            s = time.perf_counter()
            embed([q], encoder_id=enc)
            lat[enc].append((time.perf_counter() - s) * 1000)
    torch.set_num_threads(2)
    rate: dict[str, list[float]] = {INT8_ID: [], TORCH_ID: []}
    for _ in range(a.repeats):
        for enc in rate:
            s = time.perf_counter()
            embed(rows, encoder_id=enc)
            rate[enc].append(len(rows) / (time.perf_counter() - s))

    q8, f32 = embed(queries, encoder_id=INT8_ID), embed(queries, encoder_id=TORCH_ID)
    cos = (q8 * f32).sum(1)
    self_cos = (batched_int8(queries) * q8).sum(1)
    print(f"{len(queries)} queries, {len(rows)} table rows, this machine's cores: 2 shared")
    for enc, name in ((INT8_ID, "int8 ONNX"), (TORCH_ID, "fp32 torch")):
        print(
            f"  {name:<10} per query p50 {np.percentile(lat[enc], 50):5.2f} ms, p99 {np.percentile(lat[enc], 99):6.2f} ms;  table {statistics.median(rate[enc]):6.0f} rows/s (min {min(rate[enc]):.0f}, max {max(rate[enc]):.0f})"
        )
    r50 = np.percentile(lat[TORCH_ID], 50) / np.percentile(lat[INT8_ID], 50)
    print(
        f"  int8 vs fp32: {r50:.1f}x faster per query (p50), {statistics.median(rate[INT8_ID]) / statistics.median(rate[TORCH_ID]):.1f}x the rows/s"
    )
    print(f"  cosine int8 to fp32: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"  cosine int8 in padded batches of 64 to int8 alone: mean {self_cos.mean():.4f}, min {self_cos.min():.4f}")


if __name__ == "__main__":
    main()
