"""Flow: merge sources, filter, dedupe, then expand to a target (``bucketchat build-super``)."""

from prefect import flow

from conversations.dataset import sibling
from conversations.records import Columns
from flows.prepare import prepare_flow
from tasks.caching import outputs_missing
from tasks.data import expand_dataset


@flow(name="build-super")
def build_super_flow(
    inputs: list[str],
    output: str,
    target: int | None = None,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    seed: int = 42,
    strict: bool = False,
    near_dup_threshold: float = 0.9,
    near_duplicates: str = "drop",
    columns: Columns | None = None,
) -> dict:
    """``near_duplicates="link"`` keeps near duplicates in their twin's family (the pipeline's choice
    for training data) instead of dropping them. ``columns`` names the columns of table sources."""
    # With a target, the merged set is its own artifact and the expansion writes --output: each stage
    # writes a new file, so a cached stage never points at a file a later stage overwrote.
    merged_path = str(sibling(output, ".merged.jsonl")) if target else output
    merged = prepare_flow(inputs, merged_path, strict, near_dup_threshold, near_duplicates, columns)
    if target and target > merged["records"]:
        grown = expand_dataset.with_options(refresh_cache=outputs_missing(output))(
            merged["parquet"], output, target, creative_prob, blend_prob, seed
        )
        return {**merged, **{k: v for k, v in grown.items() if v is not None}}
    return merged


if __name__ == "__main__":
    import sys

    print(build_super_flow(sys.argv[2:], sys.argv[1]))
