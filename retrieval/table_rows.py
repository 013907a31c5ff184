"""One table version's rows as training and promotion read them: the vectors (N, D) in a memory
map, the other columns as plain lists, a batch of rows at a time, so memory stays flat in the table's
size (the vectors of 1M rows are ~1.5 GB)."""

from __future__ import annotations

import numpy as np

from models.memory import scratch_array
from retrieval.index_build import TableRows
from retrieval.locations import build_dir
from retrieval.store import open_table, table_encoder


def table_rows(db: str, table: str, version: int) -> dict:
    """The columns training needs from one table version: vectors (N, D) and plain lists.

    Read a batch at a time: the vectors go into a memory-mapped float32 file beside the table
    (unlinked at once, so nothing is left behind), not into the process's own memory. Reading the
    version whole held it three times over at its peak (Arrow's copy, its combined chunks and a
    float32 copy: ~4.5 GB at 1M rows); a map's pages are the kernel's to keep or drop.
    """
    tbl = open_table(db, table, version)
    rows = TableRows(tbl)
    names = {"ids": "id", "parents": "parent_id", "users": "user", "responses": "assistant", "groups": "group"}
    out: dict = {key: [] for key in names}
    buckets = np.zeros(rows.count, np.int64)
    vectors = scratch_array(build_dir(db), (rows.count, rows.dim), np.float32)
    # Responses, groups and parents repeat across rows: one string object per distinct value, not one
    # per row (to_pylist makes a new one each time).
    shared: dict[str, dict] = {"parents": {}, "responses": {}, "groups": {}}
    at = 0
    for batch in rows.batches([*names.values(), "bucket", "vector"]):
        m = len(batch)
        for key, column in names.items():
            values = batch.column(column).to_pylist()
            if key in shared:
                seen = shared[key]
                values = [seen.setdefault(v, v) for v in values]
            out[key] += values
        buckets[at : at + m] = batch.column("bucket").to_numpy(zero_copy_only=False)
        vectors[at : at + m] = batch.column("vector").flatten().to_numpy().reshape(m, rows.dim)
        at += m
    return out | {"buckets": buckets, "vectors": vectors, "encoder": table_encoder(tbl)}


def vectors_by_id(db: str, table: str, version: int, ids: list[str]) -> np.ndarray:
    """The vectors of rows ``ids``, in that order, from ``table@version`` (a re-embedded version
    holds the same rows, not necessarily in the same order)."""
    other = table_rows(db, table, version)
    where = {i: n for n, i in enumerate(other["ids"])}
    return other["vectors"][[where[i] for i in ids]]
