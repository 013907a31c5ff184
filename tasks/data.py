"""Prefect tasks for the data stages. Each reads files and writes files, and returns their paths and
counts: nothing large or live passes between tasks."""

from __future__ import annotations

from prefect import task

from tasks import run_logger
from tasks.augment import expand
from tasks.dataset import dedupe_exact, quality_filter, read_input, read_pairs, write_dataset, write_rejects


@task
def prepare_dataset(inputs: list[str], output: str, strict: bool = False) -> dict:
    """Merge sources, drop unusable and duplicate pairs, write the dataset and its rejects file."""
    logger = run_logger()
    pairs, rejects = [], []
    for path in inputs:
        got, bad = read_pairs(path, strict=strict)
        logger.info("%s: %d pairs, %d rejected lines", path, len(got), len(bad))
        pairs += got
        rejects += bad
    pairs, low_quality = quality_filter(pairs)
    pairs, duplicates = dedupe_exact(pairs)
    written = write_dataset(pairs, output)
    rejected = write_rejects(rejects + low_quality + duplicates, output)
    return {**written, "rejects": rejected, "records": len(pairs), "rejected_lines": len(rejects), "low_quality": len(low_quality), "duplicates": len(duplicates)}


@task
def expand_dataset(input: str, output: str, target: int, creative_prob: float = 0.0, blend_prob: float = 0.0, seed: int = 42, strict: bool = False) -> dict:
    """Grow a dataset to exactly ``target`` pairs with synthetic variants (see tasks/augment.py)."""
    pairs, rejected, rejects_file = read_input(input, output, strict)
    grown = expand(pairs, target, creative_prob=creative_prob, blend_prob=blend_prob, seed=seed)
    return {**write_dataset(grown, output), "rejects": rejects_file, "records": len(grown), "input_records": len(pairs), "rejected_lines": rejected}
