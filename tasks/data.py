"""Prefect tasks for the data stages. Each reads files and writes files, and returns their paths and
counts: nothing large or live passes between tasks."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from prefect import task

from conversations.augment import expand_stream
from conversations.dataset import InputStream, iter_parquet, read_input, rejects_path, sibling, write_dataset, write_rejects
from conversations.dedupe import DropReport, QualityConfig, dedupe_stream
from conversations.records import Columns, Reject
from conversations.text import json_line
from models import progress
from models.atomic import atomic_path, write_text
from tasks import run_logger
from tasks.caching import CACHED, file_digest


class NoUsablePairs(ValueError):
    """Nothing survived reading and filtering: every later stage would fail less clearly."""


def shard_path(source: str, staging: str | Path) -> Path:
    """Where ``validate_source`` writes a source's pairs: named by its content, so a changed source
    gets a new shard."""
    return Path(staging) / f"{Path(source).stem}-{file_digest(Path(source))[:12]}.parquet"


@task(**CACHED)
def validate_source(path: str, staging: str, strict: bool = False, columns: Columns | None = None) -> dict:
    """Read one source: its pairs to a Parquet shard in ``staging``, its malformed lines beside it.

    Mapped over the sources, so they are read in parallel (threads, or a Dask cluster).
    """
    shard = shard_path(path, staging)
    # A pair at a time: a large source is never held. An empty one is judged with the others by merge_sources.
    pairs = InputStream(path, shard, strict, columns, allow_empty=True)
    write_dataset(pairs, shard)
    rejects = pairs.rejects_file or write_rejects([], shard)  # a dataset an earlier stage wrote has none
    run_logger().info("%s: %d pairs, %d malformed lines", path, pairs.pairs, pairs.rejected)
    return {"source": path, "shard": str(shard), "rejects": rejects, "pairs": pairs.pairs, "malformed": pairs.rejected}


@task(**CACHED)
def merge_sources(shards: list[dict], output: str, near_dup_threshold: float = 0.9, near_duplicates: str = "drop") -> dict:
    """Stream the shards, in source order, through quality filters and exact/near dedupe; write the
    dataset, one rejects file (malformed lines + every dropped pair, with reasons) and
    ``<output>.report.json`` with counts per reason. The kept pairs stream into the dataset as they
    are found; memory holds what the duplicate checks need per pair (conversations/dedupe.py)."""
    cfg = QualityConfig(near_dup_threshold=near_dup_threshold)
    report = DropReport()
    with atomic_path(rejects_path(output)) as tmp, open(tmp, "w", encoding="utf-8") as rejects_file:
        for shard in shards:  # malformed lines first, as the sources had them
            rejects_file.write(Path(shard["rejects"]).read_text(encoding="utf-8"))

        def reject(r: Reject) -> None:
            rejects_file.write(json_line(r.to_record()))

        def pairs(bar):
            for shard in shards:
                for p in iter_parquet(shard["shard"]):
                    bar.update(1)
                    yield p

        with progress.bar(sum(s["pairs"] for s in shards), "dedupe", "pair") as bar:
            kept = dedupe_stream(pairs(bar), report, cfg, on_drop=reject, near_duplicates=near_duplicates)
            first = next(kept, None)
            # Nothing kept: no dataset is written (the error below says why), only the rejects.
            written = write_dataset(itertools.chain([first], kept), output) if first is not None else None
    malformed = sum(s["malformed"] for s in shards)
    summary = {
        "sources": {s["source"]: {"pairs": s["pairs"], "malformed": s["malformed"]} for s in shards},
        **report.to_dict(),
        "malformed_lines": malformed,
        "near_dup_threshold": near_dup_threshold,
    }
    report_path = sibling(output, ".report.json")
    write_text(report_path, json.dumps(summary, indent=2))
    dups = report.dropped["exact duplicate"] + report.dropped["near duplicate"]
    if written is None:
        raise NoUsablePairs(
            f"no usable conversation pairs in {', '.join(s['source'] for s in shards)}: {malformed:,} malformed line(s) and {report.to_dict()['dropped_total']:,} pair(s) dropped, every one in {rejects_path(output)} with its reason; fix those lines, or add data"
        )
    return {
        **written,
        "rejects": str(rejects_path(output)),
        "report": str(report_path),
        "records": report.kept,
        "rejected_lines": malformed,
        "duplicates": dups,
        "low_quality": report.to_dict()["dropped_total"] - dups,
        "dropped": dict(report.dropped),
        "near_duplicates_linked": report.linked,
    }


@task(**CACHED)
def expand_dataset(
    input: str,
    output: str,
    target: int,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    seed: int = 42,
    strict: bool = False,
    columns: Columns | None = None,
) -> dict:
    """Grow a dataset to exactly ``target`` pairs with synthetic variants (see conversations/augment.py)."""
    pairs, rejected, rejects_file = read_input(input, output, strict, columns)
    inconsistent: Counter = Counter()
    # Written as they are made: the output (often many times the input) is never held.
    written = write_dataset(expand_stream(pairs, target, inconsistent, creative_prob, blend_prob, seed), output)
    run_logger().info(
        "expanded %d -> %d records; %d variants dropped as inconsistent: %s",
        len(pairs),
        target,
        sum(inconsistent.values()),
        dict(inconsistent),
    )
    return {
        **written,
        "rejects": rejects_file,
        "records": target,
        "input_records": len(pairs),
        "rejected_lines": rejected,
        "inconsistent_variants": dict(inconsistent),
    }
