"""Flow: the whole chain on embedded defaults — the only place that knows the stage order.

data files -> prepare (merge, filter, dedupe) -> [expand to --target] -> build-db -> finetune ->
register -> champion (if better). Everything it makes goes under ``workdir``.
"""

from pathlib import Path

from prefect import flow

from tasks.data import expand_dataset, prepare_dataset
from tasks.database import build_database
from tasks.settings import TABLE_NAME, default_workdir
from tasks.training import register_and_promote, train_head


@flow(name="pipeline")
def pipeline_flow(data: list[str], workdir: str | None = None, target: int | None = None, creative_prob: float = 0.0, blend_prob: float = 0.0, num_buckets: int = 10, seed: int = 42, train: dict | None = None, head: dict | None = None, strict: bool = False) -> dict:
    work = Path(workdir or default_workdir()).resolve()
    train = {"seed": seed, **(train or {})}
    dataset = prepare_dataset(data, str(work / "dataset.jsonl"), strict)
    if target and target > dataset["records"]:
        dataset = {**dataset, **expand_dataset(dataset["parquet"], str(work / "dataset.jsonl"), target, creative_prob, blend_prob, seed)}
    db = str(work / "llm_chat.db")
    built = build_database(dataset["parquet"], db, TABLE_NAME, num_buckets, seed, train.get("device", "cpu"))
    trained = train_head(db, TABLE_NAME, built["version"], train, head or {}, str(work / "champion_model_chat_ft.pth"), str(work / "chat_model_meta.json"))
    promotion = register_and_promote(trained["run_id"], db, TABLE_NAME, built["version"], trained["val_ids"], trained["val_response_acc"])
    return {"workdir": str(work), "dataset": dataset, "build": built, "train": {k: v for k, v in trained.items() if k != "val_ids"}, "registry": promotion}


if __name__ == "__main__":
    import sys

    print(pipeline_flow(sys.argv[1:]))
