"""Prefect tasks for the LanceDB stage."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task

from conversations.dataset import InputStream
from conversations.records import Columns
from models.atomic import failpoint
from retrieval.build import build_table
from retrieval.index_files import open_index
from retrieval.locations import is_uri, local_dir
from retrieval.store import keep_encoder, open_table, reembed_table, stats, table_encoder
from tasks import run_logger
from tasks.retries import IO_RETRIES


@task(**IO_RETRIES)  # I/O on the table folder; a rebuild is safe to repeat
def build_database(
    data: str,
    db: str,
    table: str,
    num_buckets: int = 10,
    seed: int = 0,
    device: str = "cpu",
    strict: bool = False,
    columns: Columns | None = None,
    encoder: str | None = None,
) -> dict:
    """Embed, bucket and write ``data`` as a new version of ``table``, and save its search index beside
    it (chat opens that, memory-mapped, instead of building one); rejects go beside the db.
    ``encoder``: a sentence-transformers folder to embed with (default: the shipped MiniLM)."""
    logger = run_logger()
    # llm_chat.db -> llm_chat.rejects.jsonl beside it; for an object-store db, in its local folder.
    beside = local_dir(db) / Path(db).name if is_uri(db) else db
    # The pairs are streamed, never all held (~1 KB a row): retrieval/build.py.
    pairs = InputStream(data, beside, strict, columns)
    result = build_table(pairs, db, table, num_buckets=num_buckets, seed=seed, device=device, encoder=encoder, log=logger.info)
    rejected, rejects_file = pairs.rejected, pairs.rejects_file
    if result.reused:
        logger.info("table %s@%d already holds exactly these %d rows; no new version written", table, result.version, result.rows)
    else:
        logger.info(
            "table %s@%d: %d rows, %d newly embedded, %d rejected lines", table, result.version, result.rows, result.embedded, rejected
        )
    _, index = open_index(result.db, result.table, result.version)  # built unless already there
    logger.info("search index of %s@%d: %d rows, built in %.1f s", table, result.version, index["rows"], index["build_s"])
    return {**asdict(result), "rejects": rejects_file, "rejected_lines": rejected}


PARTITION_ROWS = 20_000  # texts per mapped embedding task: a minute or so of one worker's time


@task(**IO_RETRIES)
def plan_embedding(
    data: str,
    db: str,
    strict: bool = False,
    columns: Columns | None = None,
    encoder: str | None = None,
    partition_rows: int = PARTITION_ROWS,
) -> dict:
    """The messages a build of ``data`` would embed (those not in the table's embedding cache), as
    Parquet partitions for ``embed_partition`` to map over; none when everything is cached.

    The data is streamed and matched on 64-bit key hashes (retrieval/build.py does the same): what
    is held is 8 bytes per cached vector and per new message, and one partition's texts."""
    import shutil
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval.embedding_cache import EmbeddingCache, key_hashes, lookup
    from retrieval.encoder import ENCODER_ID, text_key
    from retrieval.store import CACHE_DIR

    beside = local_dir(db) / Path(db).name if is_uri(db) else db
    encoder_id, encoder_path = keep_encoder(db, encoder) if encoder else (ENCODER_ID, None)
    cache = local_dir(db) / CACHE_DIR
    known = EmbeddingCache(cache, encoder_id, encoder_path).known_hashes()
    for stale in cache.glob("staging-*"):  # a killed build's partitions: planned again below if still needed
        shutil.rmtree(stale, ignore_errors=True)
    staging = cache / f"staging-{uuid.uuid4().hex[:8]}"
    partitions: list[str] = []
    seen: set[int] = set()
    todo: list[str] = []

    def write_partition() -> None:
        path = staging / f"part-{len(partitions):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": todo}), path)
        partitions.append(str(path))
        todo.clear()

    def plan(texts: list[str]) -> None:
        hashes = key_hashes([text_key(t, encoder_id) for t in texts])
        cached = lookup(known, hashes)[1]
        for text, h, hit in zip(texts, hashes.tolist(), cached.tolist()):
            if not hit and h not in seen:
                seen.add(h)
                todo.append(text)
                if len(todo) == partition_rows:
                    write_partition()

    pairs, batch = InputStream(data, beside, strict, columns), []
    for pair in pairs:
        batch.append(pair.user)
        if len(batch) == 16_384:
            plan(batch)
            batch = []
    plan(batch)
    if todo:
        write_partition()
    run_logger().info("%d of %d messages to embed, in %d partition(s)", len(seen), pairs.pairs, len(partitions))
    return {"cache": str(cache), "encoder_id": encoder_id, "encoder_path": encoder_path, "partitions": partitions, "texts": len(seen)}


@task  # no retries: a worker that dies is Dask's to replace, and the task then runs again there
def embed_partition(partition: str, cache: str, encoder_id: str, encoder_path: str | None = None, device: str = "cpu") -> int:
    """Embed one partition's texts into the embedding cache (a shard of its own); returns how many
    were embedded. Each worker process loads the encoder once, for all the partitions it runs."""
    import pyarrow.parquet as pq

    from retrieval.embedding_cache import EmbeddingCache

    texts = pq.read_table(partition)["text"].to_pylist()
    failpoint("embed:partition")
    done = EmbeddingCache(cache, encoder_id, encoder_path).fill(texts, device)
    Path(partition).unlink(missing_ok=True)
    return done


@task(**IO_RETRIES)  # a re-embedding writes a new version; repeating it writes another, never a half one
def embed_version(db: str, table: str, version: int, encoder: str, device: str = "cpu") -> int:
    """``table@version`` with vectors from ``encoder`` (a sentence-transformers folder): that version
    when it already has them, else a new version of the same rows re-embedded (ids, buckets and
    responses unchanged), with its search index. What ``finetune --encoder`` trains on."""
    encoder_id, kept = keep_encoder(db, encoder)
    if table_encoder(open_table(db, table, version)) == encoder_id:
        return version
    new = reembed_table(db, table, version, kept, encoder_id, device)
    open_index(db, table, new)
    run_logger().info("table %s@%d re-embedded with %s as version %d", table, version, encoder_id, new)
    return new


@task
def database_stats(db: str, table: str) -> dict:
    return stats(db, table)
