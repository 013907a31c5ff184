"""Flow: train every head size on one table version, so the MLflow UI can compare them side by side.

Each size is its own MLflow run (tagged ``model_size``) and registered version; the champion moves to
whichever beats it on validation. Sizes run one after another: on a 2-core machine parallel training
only slows each down.
"""

from prefect import flow

from models.config import SIZES, HeadSettings, TrainConfig
from tasks.database import build_database
from tasks.promotion import register_and_promote
from tasks.settings import MODEL_NAME, TABLE_NAME
from tasks.training import train_head


@flow(name="size-sweep")
def size_sweep_flow(
    db: str,
    data: str | None = None,
    table: str = TABLE_NAME,
    table_version: int | None = None,
    sizes: list[str] | None = None,
    train: TrainConfig | None = None,
    head: HeadSettings | None = None,
    num_buckets: int = 10,
    model_name: str = MODEL_NAME,
    replace_champion: bool = False,
) -> dict:
    """``head`` gives the widths for the sizes that have those branches; each size keeps its own."""
    train, head = train or TrainConfig(), head or HeadSettings(model_size="xxlarge", num_buckets=num_buckets)
    sizes = list(sizes or SIZES)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"--sizes {', '.join(unknown)} unknown; choose from {', '.join(SIZES)}")
    if data:
        table_version = build_database(data, db, table, head.num_buckets, train.seed, train.device)["version"]
    elif table_version is None:
        from retrieval.store import latest_complete_version

        table_version = latest_complete_version(db, table)
    results = {}
    for size in sizes:
        trained = train_head.with_options(task_run_name=f"train-{size}")(db, table, table_version, train, head.for_size(size))
        promotion = register_and_promote(
            trained["run_id"],
            db,
            table,
            trained["table_version"],
            trained["val_ids"],
            trained["val_response_acc"],
            val_right=trained["val_right"],
            model_name=model_name,
            replace_champion=replace_champion,
        )
        results[size] = {
            "run_id": trained["run_id"],
            "val_response_acc": trained["val_response_acc"],
            "examples_per_second": trained["metrics"]["examples_per_second"],
            "registry": promotion,
        }
    return {"table": {"db": db, "name": table, "version": table_version}, "sizes": results}
