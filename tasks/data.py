"""Prefect tasks for the data stages. Each reads files and writes files, and returns their paths and
counts: nothing large or live passes between tasks."""

from __future__ import annotations

from prefect import task

from tasks import run_logger
from tasks.augment import expand
from models.atomic import atomic_path, write_text
from tasks.dataset import read_input, rejects_path, write_dataset
from tasks.dedupe import QualityConfig, filter_and_dedupe
from tasks.records import Pair, Reject, iter_records


@task
def prepare_dataset(inputs: list[str], output: str, strict: bool = False, near_dup_threshold: float = 0.9) -> dict:
    """Merge sources, drop unusable and duplicate pairs, write the dataset, its rejects file and a
    report of every drop reason with counts (``<output>.report.json``).

    Streams: lines are read one at a time and every reject is written as it is found, so memory holds
    only the pairs that are kept.
    """
    import json
    from pathlib import Path

    logger = run_logger()
    cfg = QualityConfig(near_dup_threshold=near_dup_threshold)
    per_source: dict[str, dict[str, int]] = {}
    with atomic_path(rejects_path(output)) as tmp, open(tmp, "w", encoding="utf-8") as rejects_file:

        def reject(r: Reject) -> None:
            rejects_file.write(json.dumps(r.to_record(), ensure_ascii=False) + "\n")

        def records():
            for path in inputs:
                counts = per_source.setdefault(path, {"pairs": 0, "malformed": 0})
                for item in iter_records(path, strict=strict):
                    if isinstance(item, Pair):
                        counts["pairs"] += 1
                        yield item
                    else:
                        counts["malformed"] += 1
                        reject(item)
                logger.info("%s: %d pairs, %d malformed lines", path, counts["pairs"], counts["malformed"])

        kept, report = filter_and_dedupe(records(), cfg, on_drop=reject)
    malformed = sum(c["malformed"] for c in per_source.values())
    summary = {"sources": per_source, **report.to_dict(), "malformed_lines": malformed, "near_dup_threshold": near_dup_threshold}
    report_path = Path(output).with_suffix("").with_suffix(".report.json")
    write_text(report_path, json.dumps(summary, indent=2))
    return {
        **write_dataset(kept, output), "rejects": str(rejects_path(output)), "report": str(report_path), "records": len(kept),
        "rejected_lines": malformed, "duplicates": report.dropped["exact duplicate"] + report.dropped["near duplicate"],
        "low_quality": report.to_dict()["dropped_total"] - report.dropped["exact duplicate"] - report.dropped["near duplicate"],
        "dropped": dict(report.dropped),
    }


@task
def expand_dataset(input: str, output: str, target: int, creative_prob: float = 0.0, blend_prob: float = 0.0, seed: int = 42, strict: bool = False) -> dict:
    """Grow a dataset to exactly ``target`` pairs with synthetic variants (see tasks/augment.py)."""
    pairs, rejected, rejects_file = read_input(input, output, strict)
    grown, inconsistent = expand(pairs, target, creative_prob=creative_prob, blend_prob=blend_prob, seed=seed)
    run_logger().info("expanded %d -> %d records; %d variants dropped as inconsistent: %s", len(pairs), len(grown), sum(inconsistent.values()), dict(inconsistent))
    return {**write_dataset(grown, output), "rejects": rejects_file, "records": len(grown), "input_records": len(pairs), "rejected_lines": rejected, "inconsistent_variants": dict(inconsistent)}
