"""Training around MLflow: fit a head on a pinned table version, log it, register it, and move the
champion alias only when the new version is at least as good on the same validation set."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import torch
from prefect import task

from models import checkpoint
from models.heads import BucketHead, HeadConfig
from models.train import Candidates, TrainConfig, calibrate_min_confidence, split_indices, train
from retrieval.encoder import ENCODER_ID
from retrieval.store import open_table
from tasks import registry, run_logger


def table_rows(db: str, table: str, version: int) -> dict:
    """The columns training needs from one table version: vectors (N, 384) and plain lists."""
    data = open_table(db, table, version).to_arrow().select(["id", "parent_id", "assistant", "group", "bucket", "vector"])
    return {
        "ids": data["id"].to_pylist(),
        "parents": data["parent_id"].to_pylist(),
        "responses": data["assistant"].to_pylist(),
        "groups": data["group"].to_pylist(),
        "buckets": np.asarray(data["bucket"].to_numpy(), dtype=np.int64),
        "vectors": data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), -1).astype(np.float32),
    }


def fit(db: str, table: str, version: int, train_cfg: TrainConfig, head_cfg: dict, on_epoch=None) -> tuple[BucketHead, dict, dict]:
    """Train a head on ``table@version``; returns (head, meta, validation ids and accuracy)."""
    rows = table_rows(db, table, version)
    cands = Candidates.select(rows["responses"], rows["buckets"].tolist(), train_cfg.max_candidates_per_bucket)
    y_cand = cands.targets(rows["responses"], rows["buckets"].tolist())
    tr, va = split_indices(rows["responses"], rows["ids"], train_cfg.val_split, train_cfg.split_mode, train_cfg.seed, rows["parents"])
    cfg = HeadConfig(num_candidates=len(cands.texts), input_dim=rows["vectors"].shape[1], **head_cfg)
    torch.manual_seed(train_cfg.seed)  # the initial weights too: the same data and seed give the same model
    head = BucketHead(cfg, torch.tensor(cands.buckets), torch.tensor(cands.learned))
    result = train(head, rows["vectors"], rows["buckets"], y_cand, tr, va, train_cfg, on_epoch=on_epoch)
    head.cpu().eval()
    with torch.no_grad():
        _, log_pr = head.response_log_probs(torch.from_numpy(rows["vectors"][va]))
    y_va = torch.from_numpy(y_cand[va])
    best = result.history[result.best_epoch - 1]
    meta = {
        "encoder": ENCODER_ID,
        "table": {"db": str(Path(db).resolve()), "name": table, "version": int(version)},
        "candidates": {"texts": cands.texts, "buckets": cands.buckets, "counts": cands.counts},
        "bucket_map": dict(sorted(set(zip(rows["groups"], rows["buckets"].tolist())))),
        "all_responses_learned": not cands.other,
        "calibration": {"min_confidence": calibrate_min_confidence(log_pr, y_va, head.candidate_learned) if len(va) else 0.0, "val_rows": int(len(va))},
        "metrics": {k: v for k, v in best.items() if k != "lr"} | {"best_epoch": result.best_epoch, "epochs_run": len(result.history)},
        "train_config": train_cfg.to_dict(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    val = {"ids": [rows["ids"][i] for i in va], "accuracy": best.get("val_response_acc")}
    return head, meta, val


def response_accuracy(weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str]) -> float | None:
    """Response accuracy of any checkpoint on the given rows of ``table@version`` (its argmax
    candidate's text equals the row's response). None when there is nothing to compare on."""
    if not val_ids:
        return None
    rows = table_rows(db, table, version)
    where = {i: n for n, i in enumerate(rows["ids"])}
    idx = [where[i] for i in val_ids if i in where]
    head, meta = checkpoint.load(weights, meta_path)
    if meta.get("encoder") != ENCODER_ID or head.cfg.input_dim != rows["vectors"].shape[1]:
        return None  # a head for another encoder cannot be scored on these vectors
    with torch.no_grad():
        _, log_pr = head.response_log_probs(torch.from_numpy(rows["vectors"][idx]))
    texts = meta["candidates"]["texts"]  # None for an "other" slot: never equal to a response
    predicted = [texts[j] for j in log_pr.argmax(1).tolist()]
    return float(np.mean([p == rows["responses"][i] for p, i in zip(predicted, idx)]))


@task
def train_head(db: str, table: str, version: int, train: dict, head: dict, output: str | None = None, meta: str | None = None) -> dict:
    """Fit, log params/metrics/checkpoint to MLflow, and write the local ``--output``/``--meta``."""
    import mlflow

    logger = run_logger()
    train_cfg = TrainConfig(**train)
    registry.configure()
    size = head.get("model_size", "base")
    with mlflow.start_run(run_name=f"{size}-{table}-v{version}") as run:
        mlflow.set_tags({"model_size": size, "table": table, "table_version": str(version), "db": str(Path(db).resolve()), "encoder": ENCODER_ID})
        mlflow.log_params({**train, **{f"head.{k}": v for k, v in head.items()}, "table_version": version})

        def on_epoch(row: dict) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            logger.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))

        model, meta_dict, val = fit(db, table, version, train_cfg, head, on_epoch=on_epoch)
        meta_dict["mlflow_run_id"] = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / registry.MODEL_ARTIFACT
            checkpoint.save(model, meta_dict, folder / registry.WEIGHTS_FILE, folder / registry.META_FILE)
            mlflow.log_metrics({f"best_{k}": float(v) for k, v in meta_dict["metrics"].items()})
            mlflow.log_metric("min_confidence", meta_dict["calibration"]["min_confidence"])
            mlflow.log_artifacts(str(folder), registry.MODEL_ARTIFACT)
        if output or meta:
            checkpoint.save(model, meta_dict, output or "champion_model_chat_ft.pth", meta or "chat_model_meta.json")
    return {"run_id": run.info.run_id, "val_ids": val["ids"], "val_response_acc": val["accuracy"], "metrics": meta_dict["metrics"], "candidates": len(meta_dict["candidates"]["texts"])}


@task(retries=2, retry_delay_seconds=1)  # registry writes are I/O against the tracking store
def register_and_promote(run_id: str, db: str, table: str, version: int, val_ids: list[str], val_response_acc: float | None) -> dict:
    """Register the run's model; move ``champion`` to it unless the current champion scores higher on
    this run's validation rows. Returns the new version, whether it was promoted, and why."""
    logger = run_logger()
    tags = {"val_response_acc": f"{val_response_acc:.6f}" if val_response_acc is not None else "n/a", "table_version": str(version)}
    new_version = registry.register(run_id, tags)
    current = registry.champion_version()
    champion_acc = None
    if current is not None:
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta = registry.download_model(f"models:/{registry.MODEL_NAME}/{current}", tmp)
            champion_acc = response_accuracy(str(weights), str(meta), db, table, version, val_ids)
    if current is None:
        promoted, reason = True, "no champion yet"
    elif champion_acc is None or val_response_acc is None:
        promoted, reason = True, "the champion cannot be scored on this validation set"
    elif val_response_acc >= champion_acc:
        promoted, reason = True, f"validation response accuracy {val_response_acc:.4f} >= champion v{current}'s {champion_acc:.4f}"
    else:
        promoted, reason = False, f"validation response accuracy {val_response_acc:.4f} < champion v{current}'s {champion_acc:.4f}; champion kept"
    if promoted:
        registry.set_champion(new_version)
    logger.info("model version %d: %s", new_version, reason)
    return {"version": new_version, "promoted": promoted, "reason": reason, "previous_champion": current, "champion_val_acc": champion_acc}
