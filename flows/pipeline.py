"""Flow: the whole chain on embedded defaults — the only place that knows the stage order.

data files -> prepare (merge, filter, dedupe) -> [expand, with --target] -> build-db -> finetune ->
register -> champion (if better) -> a summary (a Prefect markdown artifact). Everything it makes goes under ``workdir``; the data stages are
cached on their code, parameters and input bytes, so a rerun on unchanged data skips them.
"""

from pathlib import Path

from prefect import flow

from conversations.records import Columns
from flows.build_db import build_db_flow
from flows.build_super import build_super_flow
from flows.finetune import finetune_flow
from models.config import HeadSettings, TrainConfig
from tasks.settings import MODEL_NAME, TABLE_NAME, default_workdir
from tasks.summary import publish_summary


@flow(name="pipeline")
def pipeline_flow(
    data: list[str],
    workdir: str | None = None,
    target: int | None = None,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    num_buckets: int = 10,
    seed: int = 42,
    train: TrainConfig | None = None,
    head: HeadSettings | None = None,
    strict: bool = False,
    near_dup_threshold: float = 0.9,
    weights: str | None = None,
    resume: bool = False,
    force: bool = False,
    db: str | None = None,
    model_name: str = MODEL_NAME,
    replace_champion: bool = False,
    columns: Columns | None = None,
    encoder: str | None = None,
    dask_workers: int = 0,
    dask_address: str | None = None,
) -> dict:
    """``seed`` drives expansion and bucket assignment, and training when ``train`` is not given;
    ``num_buckets`` applies when ``head`` is not given (a given ``head`` says its own). ``data`` files
    are JSONL, JSON arrays, CSV or Parquet; ``columns`` names a table's columns; ``encoder`` is a
    sentence-transformers folder to embed with instead of the shipped MiniLM (chat then uses it too);
    ``dask_workers``/``dask_address`` embed new rows on a Dask cluster (flows/build_db.py)."""
    work = Path(workdir or default_workdir()).resolve()
    train, head = train or TrainConfig(seed=seed), head or HeadSettings(num_buckets=num_buckets)
    # Training keeps near duplicates (real phrasings) but links them to their twin's family, so the
    # validation split never sees a twin of a training row; build-super on its own drops them.
    dataset = build_super_flow(
        data,
        output=str(work / "dataset.jsonl"),
        target=target or None,
        creative_prob=creative_prob,
        blend_prob=blend_prob,
        seed=seed,
        strict=strict,
        near_dup_threshold=near_dup_threshold,
        near_duplicates="link",
        columns=columns,
    )
    db = db or str(work / "llm_chat.db")  # or an object-store URI (s3://…): only LanceDB's files go there
    built = build_db_flow(
        dataset["parquet"],
        db,
        table=TABLE_NAME,
        num_buckets=head.num_buckets,
        seed=seed,
        device=train.device,
        encoder=encoder,
        dask_workers=dask_workers,
        dask_address=dask_address,
    )
    tuned = finetune_flow(
        db,
        table=TABLE_NAME,
        table_version=built["version"],
        train=train,
        head=head,
        output=str(work / "champion_model_chat_ft.pth"),
        meta=str(work / "chat_model_meta.json"),
        weights=weights,
        resume=resume,
        force=force,
        model_name=model_name,
        replace_champion=replace_champion,
    )
    result = {"workdir": str(work), "dataset": dataset, **tuned, "build": built}
    publish_summary(result, model_name)
    return result


if __name__ == "__main__":
    import sys

    print(pipeline_flow(sys.argv[1:]))
