"""Training around MLflow: fit a head on a pinned table version, log it, register it, and move the
champion alias only when the new version scores strictly better on the same validation set."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import task

from models import checkpoint
from models.calibration import answered_right
from models.config import HeadSettings, TrainConfig, run_settings
from retrieval.locations import db_key, local_dir
from tasks import registry, run_logger
from tasks.fitting import fit


class MetricBuffer:
    """Collects metrics and sends them to MLflow in batches (``log_batch``, ≤ 1000 per call), not one
    request per value: per-step logging of a long run would otherwise dominate its wall time. A batch
    goes when ``every`` values are waiting or ``seconds`` have passed since the last, so the UI's
    charts stay live without a write per epoch (a kill -9 loses at most that much of the curves;
    the model's resume state is written separately, every few seconds).

    Hand-written because MLflow's own batching (``log_metrics(..., synchronous=False)``) was 28x
    slower into the default SQLite store: 37 s against 1.3 s for 3,000 steps of three metrics
    (``tests/bench/metric_logging.py``; BENCHMARKS.md)."""

    def __init__(self, run_id: str, every: int = 500, seconds: float = 2.0):
        from mlflow import MlflowClient

        self.client, self.run_id, self.every, self.seconds, self.items = MlflowClient(), run_id, every, seconds, []
        self.sent = time.monotonic()

    def add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(dt.datetime.now().timestamp() * 1000)
        self.items += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.items) >= self.every or time.monotonic() - self.sent >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self.sent = time.monotonic()
        while self.items:
            batch, self.items = self.items[:1000], self.items[1000:]
            self.client.log_batch(self.run_id, metrics=batch)


def log_dataset(run_id: str, db: str, pinned: dict) -> None:
    """The table version trained on as the run's MLflow dataset input (the runs table's Dataset
    column): named after its sources, its content hash as the digest, the table as the source."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from mlflow import MlflowClient

    dataset = Dataset(
        name=pinned["data"],
        digest=pinned["data_version"],
        source_type="lancedb",
        source=json.dumps({"uri": db_key(db), "table": pinned["name"], "version": pinned["version"]}),
        profile=json.dumps({"num_rows": pinned["rows"]}),
    )
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])


def bucket_report(
    log_pr: torch.Tensor,
    y_val: torch.Tensor,
    buckets_val: np.ndarray,
    cand_bucket: list[int],
    learned: torch.Tensor,
    num_buckets: int,
    folder: Path,
) -> dict:
    """Per-bucket validation accuracy (JSON) and a bucket confusion matrix (PNG) for the run."""
    pred = log_pr.argmax(1)
    right = answered_right(pred, y_val, learned).numpy()
    pred_bucket = np.asarray(cand_bucket)[pred.numpy()]
    conf = np.zeros((num_buckets, num_buckets), dtype=np.int64)
    np.add.at(conf, (buckets_val, pred_bucket), 1)
    per_bucket = {
        int(b): {
            "rows": int((buckets_val == b).sum()),
            "response_acc": float(right[buckets_val == b].mean()) if (buckets_val == b).any() else None,
        }
        for b in range(num_buckets)
    }
    (folder / "per_bucket_accuracy.json").write_text(json.dumps(per_bucket, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(conf, cmap="Blues")
    ax.set(
        xlabel="predicted bucket",
        ylabel="true bucket",
        title="validation: bucket confusion",
        xticks=range(num_buckets),
        yticks=range(num_buckets),
    )
    for (i, j), n in np.ndenumerate(conf):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > conf.max() / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(folder / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    return per_bucket


@task
def train_head(
    db: str,
    table: str,
    version: int,
    train: TrainConfig | None,
    head: HeadSettings | None,
    output: str | None = None,
    meta: str | None = None,
    weights: str | None = None,
    resume: bool = False,
) -> dict:
    """Fit, log params/metrics/checkpoint/plots to MLflow, and write the local ``--output``/``--meta``.

    A resume state is written every few seconds of training (``models/state.py``) beside ``output`` (``<output>.state``, or under the
    db folder); ``resume`` continues a killed run from it, in the same MLflow run.
    """
    import mlflow

    logger = run_logger()
    train_cfg, head_settings = run_settings(train, head)
    train, head = asdict(train_cfg), asdict(head_settings)
    registry.configure()
    size = head_settings.model_size
    state_path = Path(f"{output}.state") if output else local_dir(db) / f"_train_{table}_v{version}.state"
    run_id = None
    if resume and state_path.with_suffix(".run").is_file():
        run_id = state_path.with_suffix(".run").read_text().strip() or None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{size} · {table} v{version}") as run:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.with_suffix(".run").write_text(run.info.run_id)
        if not run_id:
            mlflow.set_tags(
                {
                    "model_size": size,
                    "table": table,
                    "table_version": str(version),
                    "db": db_key(db),
                    "train_all": str(train_cfg.train_all),
                    "warm_start": weights or "",
                }
            )
            mlflow.log_params({**train, **{f"head.{k}": v for k, v in head.items()}, "table_version": version, "weights": weights or ""})
        buffer = MetricBuffer(run.info.run_id)

        def on_step(row: dict) -> None:
            buffer.add({f"step_{k}": v for k, v in row.items() if k != "step"}, row["step"])

        def on_epoch(row: dict) -> None:
            buffer.add({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
            logger.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))

        model, meta_dict, extras = fit(
            db,
            table,
            version,
            train_cfg,
            head_settings,
            on_epoch=on_epoch,
            on_step=on_step,
            weights=weights,
            state_path=str(state_path),
            resume=resume,
            logger=logger,
        )
        buffer.flush()
        # The automatic settings as they were resolved for this data (the params above say "None").
        resolved = meta_dict["train_config"]
        mlflow.log_params(
            {f"resolved.{k}": resolved[k] for k in ("batch_size", "lr", "select_metric", "early_stop_patience", "refit", "precision")}
        )
        meta_dict["mlflow_run_id"] = run.info.run_id
        pinned = meta_dict["table"]["version"]
        log_dataset(run.info.run_id, db, meta_dict["table"])
        # The runs table's name column: the size and the data, not a generated name.
        mlflow.set_tag("mlflow.runName", f"{size} · {meta_dict['table']['data']} · {table} v{pinned}")
        mlflow.set_tags(
            {
                "size": size,
                "model_size": size,
                "data_version": meta_dict["table"]["data_version"],
                "pinned_table_version": str(pinned),
                "encoder": meta_dict["encoder"],
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / registry.MODEL_ARTIFACT
            checkpoint.save(model, meta_dict, folder / registry.WEIGHTS_FILE, folder / registry.META_FILE, encoder=extras["encoder"])
            registry.describe_pyfunc(folder, extras["examples"])
            mlflow.log_metrics({f"best_{k}": float(v) for k, v in meta_dict["metrics"].items()})
            mlflow.log_metrics({k: meta_dict["calibration"][k] for k in ("min_confidence", "min_margin", "min_similarity")})
            mlflow.log_artifacts(str(folder), registry.MODEL_ARTIFACT)
            plots = Path(tmp) / "evaluation"
            plots.mkdir()
            if len(extras["ids"]):
                bucket_report(
                    extras["log_pr"],
                    extras["y_val"],
                    extras["buckets_val"],
                    meta_dict["candidates"]["buckets"],
                    model.candidate_learned,
                    model.cfg.num_buckets,
                    plots,
                )
            if meta_dict["warm_start"]:
                (plots / "warm_start.json").write_text(json.dumps(meta_dict["warm_start"], indent=2))
            mlflow.log_artifacts(str(plots), "evaluation")
        if output or meta:
            checkpoint.save(
                model, meta_dict, output or "champion_model_chat_ft.pth", meta or "chat_model_meta.json", encoder=extras["encoder"]
            )
    # Finished: nothing left to resume.
    for done in (state_path, Path(f"{state_path}.refit"), state_path.with_suffix(".run")):
        done.unlink(missing_ok=True)
    return {
        "run_id": run.info.run_id,
        "table_version": pinned,
        "val_ids": extras["ids"],
        "val_right": extras["right"],
        "val_response_acc": extras["accuracy"],
        "metrics": meta_dict["metrics"],
        "candidates": len(meta_dict["candidates"]["texts"]),
        "model_size": size,
        "warm_start": meta_dict["warm_start"],
        "resumed_from_epoch": extras["resumed_from_epoch"],
    }
