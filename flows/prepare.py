"""Subflow: read every source in parallel (a mapped task per source), then merge, filter and dedupe.

Mapped tasks run on the flow's task runner: threads by default; a Dask cluster with
``prepare_flow.with_options(task_runner=DaskTaskRunner(address=...))`` (``prefect-dask``).
"""

from pathlib import Path

from prefect import flow, unmapped

from conversations.records import Columns
from tasks.caching import outputs_missing
from tasks.data import merge_sources, shard_path, validate_source


@flow(name="prepare")
def prepare_flow(
    inputs: list[str],
    output: str,
    strict: bool = False,
    near_dup_threshold: float = 0.9,
    near_duplicates: str = "drop",
    columns: Columns | None = None,
) -> dict:
    """``columns`` names the columns of table sources (CSV, Parquet); JSONL and JSON ignore it."""
    staging = Path(output).parent / f".{Path(output).stem}.shards"
    # A cached result is only good while its shard is on disk (a deleted workdir loses them all).
    read = validate_source.with_options(refresh_cache=outputs_missing(*(shard_path(p, staging) for p in inputs)))
    # .result() raises a source's own error here, instead of merging without it.
    shards = [f.result() for f in read.map(inputs, unmapped(str(staging)), unmapped(strict), unmapped(columns))]
    return merge_sources.with_options(refresh_cache=outputs_missing(output))(shards, output, near_dup_threshold, near_duplicates)
