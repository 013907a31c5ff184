"""Flow: scheduled retraining over a folder of data drops (the ``retrain`` deployment).

Every conversation file in ``data_dir`` (``*.jsonl``, ``*.json``, ``*.csv``, ``*.tsv``, ``*.parquet``) is one drop; the pipeline rebuilds from all of them. Work is keyed
on content, so an unchanged folder costs seconds and changes nothing: sources are not re-read or
re-deduplicated (cached stages), rows are not re-embedded (embedding cache), no table version is
written, and no model is trained or registered. When something changed, the new model is registered
and the champion moves only if it is better; the run's summary says which and why.
"""

from pathlib import Path

from prefect import flow

from conversations.records import INPUT_SUFFIXES, Columns
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
    columns: Columns | None = None,
    encoder: str | None = None,
) -> dict:
    """``target`` as in the pipeline (None or 0: no expansion). Synthetic
    variants are drawn over the whole dataset, so when a drop is added to small, expanded data they
    are redrawn and embedded anew; unchanged original rows always come from the embedding cache."""
    drops = sorted(str(p) for p in Path(data_dir).iterdir() if p.suffix.lower() in INPUT_SUFFIXES and not p.name.endswith(".rejects.jsonl"))
    if not drops:
        raise ValueError(
            f"data_dir {data_dir!r} holds no data drops; put conversation files there ({', '.join('*' + s for s in INPUT_SUFFIXES)})"
        )
    result = pipeline_flow(
        drops, workdir=workdir, target=target, train=train, head=head, force=force, model_name=model_name, columns=columns, encoder=encoder
    )
    build, reg = result["build"], result["registry"]
    table = f"table v{build['version']} " + ("unchanged" if build.get("reused") else f"written ({build['embedded']} rows newly embedded)")
    run_logger().info("retrain over %d drop(s): %s; model v%d: %s", len(drops), table, reg["version"], reg["reason"])
    return {**result, "drops": drops, "changed": not result["train"].get("skipped")}


if __name__ == "__main__":
    import sys

    print(retrain_flow(sys.argv[1]))
