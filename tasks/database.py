"""Prefect tasks for the LanceDB stage."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task

from conversations.dataset import read_input
from conversations.records import Columns
from retrieval.index_files import open_index
from retrieval.locations import is_uri, local_dir
from retrieval.store import build_table, keep_encoder, open_table, reembed_table, stats, table_encoder
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
    pairs, rejected, rejects_file = read_input(data, beside, strict, columns)
    result = build_table(pairs, db, table, num_buckets=num_buckets, seed=seed, device=device, encoder=encoder)
    if result.reused:
        logger.info("table %s@%d already holds exactly these %d rows; no new version written", table, result.version, result.rows)
    else:
        logger.info(
            "table %s@%d: %d rows, %d newly embedded, %d rejected lines", table, result.version, result.rows, result.embedded, rejected
        )
    _, index = open_index(result.db, result.table, result.version)  # built unless already there
    logger.info("search index of %s@%d: %d rows, built in %.1f s", table, result.version, index["rows"], index["build_s"])
    return {**asdict(result), "rejects": rejects_file, "rejected_lines": rejected}


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
