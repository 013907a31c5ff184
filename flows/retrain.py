"""Flow: scheduled retraining over a folder of data drops (the ``retrain`` deployment).

Every ``*.jsonl`` in ``data_dir`` is one drop; the pipeline rebuilds from all of them. Work is keyed
on content, so an unchanged folder costs seconds and changes nothing: sources are not re-read or
re-deduplicated (cached stages), rows are not re-embedded (embedding cache), no table version is
written, and no model is trained or registered. When something changed, the new model is registered
and the champion moves only if it is better; the run's summary says which and why.
"""

from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline_flow
from models.config import HeadSettings, TrainConfig
from tasks import run_logger
from tasks.settings import MODEL_NAME


@flow(name="retrain")
def retrain_flow(
    data_dir: str,
    workdir: str | None = None,
    target: int | None = None,
    train: TrainConfig | None = None,
    head: HeadSettings | None = None,
    force: bool = False,
    model_name: str = MODEL_NAME,
) -> dict:
    """``target`` as in the pipeline (None or 0: no expansion). Synthetic
    variants are drawn over the whole dataset, so when a drop is added to small, expanded data they
    are redrawn and embedded anew; unchanged original rows always come from the embedding cache."""
    drops = sorted(str(p) for p in Path(data_dir).glob("*.jsonl") if not p.name.endswith(".rejects.jsonl"))
    if not drops:
        raise ValueError(f"data_dir {data_dir!r} holds no *.jsonl data drops; put conversation JSONL files there")
    result = pipeline_flow(drops, workdir=workdir, target=target, train=train, head=head, force=force, model_name=model_name)
    build, reg = result["build"], result["registry"]
    table = f"table v{build['version']} " + ("unchanged" if build.get("reused") else f"written ({build['embedded']} rows newly embedded)")
    run_logger().info("retrain over %d drop(s): %s; model v%d: %s", len(drops), table, reg["version"], reg["reason"])
    return {**result, "drops": drops, "changed": not result["train"].get("skipped")}


if __name__ == "__main__":
    import sys

    print(retrain_flow(sys.argv[1]))
