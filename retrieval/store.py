"""The LanceDB conversation table: its schema, writing a version, opening a pinned version,
searching and describing it. retrieval/build.py builds a version from pairs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.atomic import failpoint
from retrieval.embedding_cache import EmbeddingCache
from retrieval.encoder import DIM, ENCODER_ID, INT8_SUFFIX, TORCH_ID, int8_decision, user_encoder_id
from retrieval.locations import encoder_folder, local_dir

# Below this a flat scan is faster than building an index (DESIGN.md §5: ~8 ms per 100k at numpy speed).
VECTOR_INDEX_MIN_ROWS = 20_000
CACHE_DIR = "_embedding_cache"


def schema(encoder_id: str = ENCODER_ID, content: str | None = None, dim: int = DIM) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("user", pa.string()),
            ("context", pa.string()),
            ("assistant", pa.string()),
            ("label", pa.string()),
            ("group", pa.string()),
            ("bucket", pa.int32()),
            ("source", pa.string()),
            ("parent_id", pa.string()),
            ("op", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={"encoder": encoder_id, **({"content": content} if content else {})},
    )


def connect(db: str | Path):
    """LanceDB at a folder or an object-store URI; credentials and endpoints come from the usual
    environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ENDPOINT``, ``GOOGLE_…``)."""
    import lancedb

    return lancedb.connect(str(db))


def open_table(db: str | Path, table: str, version: int | None = None):
    """Open ``table``; with ``version``, pinned to it (read-only view of that version)."""
    conn = connect(db)
    if table not in conn.list_tables().tables:
        raise ValueError(f"--db {str(db)!r} has no table {table!r}; build it with `bucketchat db build --data FILE --db {db}`")
    tbl = conn.open_table(table)
    if version is not None:
        tbl.checkout(version)
    return tbl


def read_columns(tbl, names: list[str]) -> pa.Table:
    """Only ``names`` of every row of the checked-out version (in no set order): ``to_arrow()`` would
    read the 384-d vectors too, ~20x the time at 100k rows for a count."""
    return tbl.search().select(names).limit(None).to_arrow()


def table_encoder(tbl) -> str:
    """The encoder whose vectors the table (at its checked-out version) holds."""
    meta = tbl.schema.metadata or {}
    return (meta.get(b"encoder") or TORCH_ID.encode()).decode()  # no tag: built before tables carried one (torch fp32)


def reembed_table(db: str | Path, table: str, version: int, encoder_path: str, encoder_id: str, device: str = "cpu") -> int:
    """Write ``table@version``'s rows as a new version whose vectors come from another encoder (a
    fine-tuned one): a model and the table it pins must use the same encoder. Returns the version."""
    data = open_table(db, table, version).to_arrow()
    cache = EmbeddingCache(local_dir(db) / CACHE_DIR, encoder_id, encoder_path)
    vecs, _ = cache.embed(data["user"].to_pylist(), device=device)
    data = data.set_column(
        data.schema.get_field_index("vector"), "vector", pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])
    )
    return write_version(db, table, data.cast(schema(encoder_id, dim=vecs.shape[1])), len(data))


def write_version(db: str | Path, table: str, data: pa.Table | pa.RecordBatchReader, rows: int) -> int:
    """Write ``data`` (a table, or batches streamed from a reader) as the new version of ``table``,
    with its full-text, bucket and (from ``VECTOR_INDEX_MIN_ROWS`` rows) vector indices."""
    conn = connect(db)
    # Each step below commits a version; models pin the final one returned here, never "latest", so
    # a crash part-way leaves every pinned version as it was.
    tbl = conn.create_table(table, data=data, schema=data.schema, mode="overwrite")
    failpoint("db:rows-written")
    tbl.create_fts_index("user", replace=True)
    tbl.create_scalar_index("bucket", index_type="BITMAP", replace=True)
    if rows >= VECTOR_INDEX_MIN_ROWS:
        # IVF_RQ with 8 bits: recall@10 ~0.99 where IVF_PQ defaults gave ~0.6 (DESIGN.md §5).
        tbl.create_index(metric="cosine", index_type="IVF_RQ", num_bits=8, replace=True)
    return int(tbl.version)


def indexed(tbl) -> bool:
    """Whether the checked-out version has every index a build makes (a killed build leaves a
    version with rows but without them)."""
    wanted = {"FTS", "Bitmap"} | ({"IvfRq"} if tbl.count_rows() >= VECTOR_INDEX_MIN_ROWS else set())
    return wanted <= {str(i.index_type) for i in tbl.list_indices()}


def latest_complete_version(db: str | Path, table: str) -> int:
    """The newest version of ``table`` that a build finished (rows and indices): what training uses
    when no --table_version is given, so a build killed part-way is never trained on."""
    tbl = open_table(db, table)
    for v in sorted((int(x["version"]) for x in tbl.list_versions()), reverse=True):
        tbl.checkout(v)
        if indexed(tbl):
            return v
    raise ValueError(f"--db {str(db)!r}: table {table!r} has no completely built version; rebuild it with `bucketchat db build`")


def keep_encoder(db: str | Path, folder: str | Path) -> tuple[str, str]:
    """Copy a user's encoder folder beside the table (once per content), so the table and every
    model trained on it keep working when the original folder moves; returns (id, the copy). The id
    ends in ``+onnx-int8`` when the encoder runs in int8 (``retrieval.encoder.int8_decision``)."""
    import shutil

    from models.atomic import atomic_dir

    encoder_id = user_encoder_id(folder)
    kept = encoder_folder(db, encoder_id)
    if not (kept / "model.safetensors").is_file():
        with atomic_dir(kept) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
    int8, why = int8_decision(str(kept))
    logging.getLogger(__name__).info("encoder %s: %s", encoder_id, why if int8 else f"fp32, because {why}")
    return encoder_id + (INT8_SUFFIX if int8 else ""), str(kept)


def hybrid_search(tbl, vector: np.ndarray, text: str, k: int, buckets: list[int] | None = None) -> list[dict]:
    """Top ``k`` rows by LanceDB hybrid search (native FTS + vector, fused by RRF).

    ``buckets`` prefilters to those buckets (cheap through the bitmap index). Each row carries
    ``cosine`` (its user vector against ``vector``) so callers can score it on one scale.
    """
    query = tbl.search(query_type="hybrid").vector(vector).text(text) if text.strip() else tbl.search(vector)
    if buckets is not None:
        query = query.where(f"bucket IN ({', '.join(str(int(b)) for b in buckets)})", prefilter=True)
    rows = query.select(["id", "user", "assistant", "bucket", "group", "source", "vector"]).limit(k).to_list()
    for row in rows:
        row["cosine"] = float(np.dot(np.asarray(row.pop("vector"), dtype=np.float32), vector))
    return rows


def stats(db: str | Path, table: str) -> dict:
    """Rows, buckets (rows and groups each), sources, versions and index state of the latest version."""
    tbl = open_table(db, table)
    frame = read_columns(tbl, ["bucket", "group", "source"]).to_pandas()
    per_bucket = frame.groupby("bucket").agg(rows=("group", "size"), groups=("group", "nunique"))
    indices = []
    for idx in tbl.list_indices():
        s = tbl.index_stats(idx.name)
        indices.append(
            {
                "name": idx.name,
                "type": str(idx.index_type),
                "columns": list(idx.columns),
                "indexed_rows": s.num_indexed_rows,
                "unindexed_rows": s.num_unindexed_rows,
            }
        )
    return {
        "db": str(db),
        "table": table,
        "version": int(tbl.version),
        "rows": int(len(frame)),
        "buckets": {int(b): {"rows": int(r.rows), "groups": int(r.groups)} for b, r in per_bucket.iterrows()},
        "sources": {str(k): int(v) for k, v in frame["source"].value_counts().sort_index().items()},
        "versions": [
            {"version": int(v["version"]), "timestamp": str(v["timestamp"]), "rows": int(v["metadata"].get("total_rows", 0))}
            for v in tbl.list_versions()
        ],
        "indices": indices,
        "embedding_cache": len(EmbeddingCache(local_dir(db) / CACHE_DIR)),
    }
