"""Flow: the whole chain on embedded defaults — the only place that knows the stage order.

data files -> prepare (merge, filter, dedupe) -> [expand, with --target] -> build-db -> finetune ->
register -> champion (if better). Everything it makes goes under ``workdir``; the data stages are
cached on their code, parameters and input bytes, so a rerun on unchanged data skips them.
"""

from pathlib import Path

from prefect import flow

from flows.build_db import build_db_flow
from flows.build_super import build_super_flow
from flows.finetune import finetune_flow
from tasks.settings import MODEL_NAME, TABLE_NAME, default_workdir


@flow(name="pipeline")
def pipeline_flow(
    data: list[str],
    workdir: str | None = None,
    target: int | None = None,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    num_buckets: int = 10,
    seed: int = 42,
    train: dict | None = None,
    head: dict | None = None,
    strict: bool = False,
    near_dup_threshold: float = 0.9,
    weights: str | None = None,
    resume: bool = False,
    force: bool = False,
    db: str | None = None,
    model_name: str = MODEL_NAME,
    replace_champion: bool = False,
) -> dict:
    work = Path(workdir or default_workdir()).resolve()
    train = {"seed": seed, **(train or {})}
    # Training keeps near duplicates (real phrasings) but links them to their twin's family, so the
    # validation split never sees a twin of a training row; build-super on its own drops them.
    # No expansion unless asked (--target): on held-out rows of BANKING77 train, growing 10 rows per
    # intent to 5,000 with variants cost 1.0 point (83.4 vs 84.4 %, seeds 42/1/2) once the head had
    # its n-gram path and refit, and doubled the sample pipeline's time (104 vs 49 s).
    dataset = build_super_flow(
        data,
        str(work / "dataset.jsonl"),
        target or None,
        creative_prob,
        blend_prob,
        seed,
        strict,
        near_dup_threshold,
        near_duplicates="link",
    )
    db = db or str(work / "llm_chat.db")  # or an object-store URI (s3://…): only LanceDB's files go there
    built = build_db_flow(dataset["parquet"], db, TABLE_NAME, num_buckets, seed, train.get("device", "cpu"))
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
    return {"workdir": str(work), "dataset": dataset, **tuned, "build": built}


if __name__ == "__main__":
    import sys

    print(pipeline_flow(sys.argv[1:]))
