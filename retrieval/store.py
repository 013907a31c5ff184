"""The LanceDB conversation table: build it, open a pinned version of it, search it, describe it.

Every build writes a new table version (``mode="overwrite"`` keeps the old versions readable), so a
model that pinned version N keeps answering from exactly version N after later rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from conversations.records import Pair
from models.atomic import failpoint
from retrieval.buckets import group_buckets, group_keys
from retrieval.embedding_cache import EmbeddingCache
from retrieval.encoder import DIM, ENCODER_ID, INT8_SUFFIX, TORCH_ID, int8_decision, user_encoder_id
from retrieval.locations import encoder_folder, is_uri, local_dir

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


@dataclass(frozen=True)
class BuildResult:
    db: str
    table: str
    version: int
    rows: int
    embedded: int
    buckets: dict[int, int]
    reused: bool = False  # the latest version already held exactly these rows: nothing was written


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
    return _write(db, table, data.cast(schema(encoder_id, dim=vecs.shape[1])))


def _write(db: str | Path, table: str, data: pa.Table) -> int:
    conn = connect(db)
    # Each step below commits a version; models pin the final one returned here, never "latest", so
    # a crash part-way leaves every pinned version as it was.
    tbl = conn.create_table(table, data=data, mode="overwrite")
    failpoint("db:rows-written")
    tbl.create_fts_index("user", replace=True)
    tbl.create_scalar_index("bucket", index_type="BITMAP", replace=True)
    if len(data) >= VECTOR_INDEX_MIN_ROWS:
        # IVF_RQ with 8 bits: recall@10 ~0.99 where IVF_PQ defaults gave ~0.6 (DESIGN.md §5).
        tbl.create_index(metric="cosine", index_type="IVF_RQ", num_bits=8, replace=True)
    return int(tbl.version)


def content_key(pairs: list[Pair], num_buckets: int, seed: int, encoder_id: str = ENCODER_ID) -> str:
    """What a table version is a function of: every row's fields in order, the bucketing settings and
    the encoder. Two builds with the same key would write identical rows."""
    h = hashlib.sha256(f"v1\0{encoder_id}\0{num_buckets}\0{seed}\n".encode())
    for p in pairs:
        h.update(json.dumps([p.id, p.user, p.context, p.assistant, p.label, p.source, p.parent_id, p.op], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _indexed(tbl) -> bool:
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
        if _indexed(tbl):
            return v
    raise ValueError(f"--db {str(db)!r}: table {table!r} has no completely built version; rebuild it with `bucketchat db build`")


def _unchanged(db: Path, table: str, key: str) -> BuildResult | None:
    """The latest version of ``table`` when it was built from exactly this content, else None."""
    conn = connect(db)
    if table not in conn.list_tables().tables:
        return None
    tbl = conn.open_table(table)
    if (tbl.schema.metadata or {}).get(b"content", b"").decode() != key:
        return None
    # A build killed between writing the rows and indexing them left a version without its indices:
    # build again rather than reuse it.
    if not _indexed(tbl):
        return None
    counts = Counter(read_columns(tbl, ["bucket"]).column("bucket").to_pylist())
    return BuildResult(str(db), table, int(tbl.version), sum(counts.values()), 0, dict(sorted(counts.items())), reused=True)


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


def build_table(
    pairs: list[Pair],
    db: str | Path,
    table: str,
    num_buckets: int = 10,
    seed: int = 0,
    device: str = "cpu",
    encoder: str | None = None,
) -> BuildResult:
    """Embed (through the cache), bucket and write ``pairs`` as a new version of ``table``;
    ``encoder``: a sentence-transformers folder to embed with instead of the shipped MiniLM.

    When the latest version was built from the same rows and settings it is returned as it is
    (``reused``): an unchanged data drop writes no version, so models keep pinning the same one.
    """
    if not pairs:
        raise ValueError("no usable records to build the table from; check the rejects file beside the data")
    if not is_uri(db):
        db = Path(db)
        db.mkdir(parents=True, exist_ok=True)
    encoder_id, encoder_path = keep_encoder(db, encoder) if encoder else (ENCODER_ID, None)
    key = content_key(pairs, num_buckets, seed, encoder_id)
    same = _unchanged(db, table, key)
    if same is not None:
        return same
    cache = EmbeddingCache(local_dir(db) / CACHE_DIR, encoder_id, encoder_path)
    user_vecs, new_users = cache.embed([p.user for p in pairs], device=device)
    responses = [p.assistant for p in pairs]
    labels = [p.label for p in pairs]
    keys = group_keys(labels, responses)
    groups = sorted(set(keys))
    index = {g: i for i, g in enumerate(groups)}
    row_group = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    user_sums = np.zeros((len(groups), user_vecs.shape[1]), dtype=np.float64)
    np.add.at(user_sums, row_group, user_vecs)
    response_sums = user_sums.copy()  # a labelled group's rows stand in for its responses
    # Response vectors only matter for clustering unlabelled groups, and each distinct response is
    # embedded once: summed per (group, response), never held per row (1M rows x 384 floats).
    pairs_count = Counter((g, r) for g, k, r in zip(row_group.tolist(), keys, responses) if k.startswith("response:"))
    new_resp = 0
    if pairs_count:
        uniq = list(dict.fromkeys(r for _, r in pairs_count))
        vecs, new_resp = cache.embed(uniq, device=device)
        at = {r: i for i, r in enumerate(uniq)}
        for g in {g for g, _ in pairs_count}:
            response_sums[g] = 0.0
        for (g, r), n in pairs_count.items():
            response_sums[g] += n * vecs[at[r]]
    del cache  # every vector it holds is copied out: the write and its indices need the memory more
    group_bucket = group_buckets(user_sums, response_sums, np.bincount(row_group, minlength=len(groups)), num_buckets, seed)
    buckets = group_bucket[row_group].astype(np.int32)
    data = pa.table(
        {
            "id": [p.id for p in pairs],
            "user": [p.user for p in pairs],
            "context": [json.dumps([{"role": r, "content": c} for r, c in p.context], ensure_ascii=False) for p in pairs],
            "assistant": responses,
            "label": labels,
            "group": keys,
            "bucket": pa.array(buckets, pa.int32()),
            "source": [p.source for p in pairs],
            "parent_id": [p.parent_id for p in pairs],
            "op": [p.op for p in pairs],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(user_vecs.reshape(-1)), user_vecs.shape[1]),
        },
        schema=schema(encoder_id, content=key, dim=user_vecs.shape[1]),
    )
    version = _write(db, table, data)
    counts = Counter(int(b) for b in buckets)
    return BuildResult(str(db), table, version, len(pairs), new_users + new_resp, dict(sorted(counts.items())))


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
