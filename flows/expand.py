"""Flow: grow a conversation dataset with synthetic variants (``bucketchat expand``)."""

from prefect import flow

from conversations.records import Columns
from tasks.caching import outputs_missing
from tasks.data import expand_dataset


@flow(name="expand")
def expand_flow(
    input: str,
    output: str,
    target: int,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    seed: int = 42,
    strict: bool = False,
    columns: Columns | None = None,
) -> dict:
    return expand_dataset.with_options(refresh_cache=outputs_missing(output))(
        input, output, target, creative_prob, blend_prob, seed, strict, columns
    )


if __name__ == "__main__":
    import sys

    print(expand_flow(sys.argv[1], sys.argv[2], int(sys.argv[3])))
