"""Flow: merge sources, filter, dedupe, then expand to a target (``bucketchat build-super``)."""

from prefect import flow

from tasks.data import expand_dataset, prepare_dataset


@flow(name="build-super")
def build_super_flow(inputs: list[str], output: str, target: int | None = None, creative_prob: float = 0.0, blend_prob: float = 0.0, seed: int = 42, strict: bool = False, near_dup_threshold: float = 0.9) -> dict:
    merged = prepare_dataset(inputs, output, strict, near_dup_threshold)
    if target and target > merged["records"]:
        grown = expand_dataset(merged["parquet"], output, target, creative_prob, blend_prob, seed)
        return {**merged, **{k: v for k, v in grown.items() if v is not None}}
    return merged


if __name__ == "__main__":
    import sys

    print(build_super_flow(sys.argv[2:], sys.argv[1]))
