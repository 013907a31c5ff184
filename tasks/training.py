"""Training around MLflow: fit a head on a pinned table version, log it, register it, and move the
champion alias only when the new version scores strictly better on the same validation set."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from prefect import task

from models import checkpoint
from models.atomic import failpoint
from models.calibration import answered_right, calibrate_thresholds
from models.candidates import Candidates, split_indices
from models.config import TrainConfig
from models.heads import BRANCH_WIDTHS, BRANCHES, BucketHead, HeadConfig, HeadSettings, warm_start
from models.train import Trainable, TrainData, train
from retrieval.encoder import STOCK_IDS, TORCH_ID, embed
from retrieval.neighbours import TEMPERATURE as NEIGHBOURS_TEMPERATURE
from retrieval.neighbours import K as NEIGHBOURS_K
from retrieval.neighbours import neighbour_log_probs
from retrieval.store import db_key, local_dir, open_table, read_columns, reembed_table, table_encoder
from tasks import registry, run_logger
from tasks.retries import IO_RETRIES

ENCODERS_DIR = "_encoders"  # fine-tuned encoders a table version was embedded with, by id hash


def table_rows(db: str, table: str, version: int) -> dict:
    """The columns training needs from one table version: vectors (N, 384) and plain lists."""
    tbl = open_table(db, table, version)
    data = tbl.to_arrow().select(["id", "parent_id", "user", "assistant", "group", "bucket", "vector"])
    return {
        "ids": data["id"].to_pylist(),
        "parents": data["parent_id"].to_pylist(),
        "users": data["user"].to_pylist(),
        "responses": data["assistant"].to_pylist(),
        "groups": data["group"].to_pylist(),
        "buckets": np.asarray(data["bucket"].to_numpy(), dtype=np.int64),
        "vectors": data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), -1).astype(np.float32),
        "encoder": table_encoder(tbl),
    }


def data_version(rows: dict) -> str:
    """A short content hash of the rows trained on (ids, responses, buckets): the MLflow data tag."""
    h = hashlib.sha256()
    for i, r, b in zip(rows["ids"], rows["responses"], rows["buckets"].tolist()):
        h.update(f"{i}\0{r}\0{b}\n".encode())
    return h.hexdigest()[:16]


def encoder_folder(db: str, encoder_id: str) -> Path | None:
    """Where a fine-tuned encoder used by a table version is kept (None for the stock encoder)."""
    if encoder_id in STOCK_IDS:
        return None
    return local_dir(db) / ENCODERS_DIR / encoder_id.rsplit(":", 1)[-1]


class EncoderFolder:
    """A saved encoder folder that ``checkpoint.save`` can copy next to a head."""

    def __init__(self, path: Path, encoder_id: str):
        self.path, self.encoder_id = Path(path), encoder_id

    def save(self, folder: Path) -> str:
        shutil.copytree(self.path, folder, dirs_exist_ok=True)
        return self.encoder_id


@dataclass
class Source:
    """A checkpoint to warm-start from: ``--weights FILE`` or a ``models:/…`` / ``runs:/…`` URI."""

    spec: str
    state: dict
    meta: dict | None
    encoder_path: str | None
    tmp: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, spec: str) -> Source:
        if spec.startswith(("models:/", "runs:/")):
            tmp = tempfile.mkdtemp(prefix="bucketchat-weights-")
            weights, meta_path = registry.download_model(spec, tmp)
            meta = checkpoint.load_meta(meta_path)
            return cls(spec, checkpoint.load_state(weights), meta, meta.get("encoder_path"), tmp)
        state = checkpoint.load_state(spec)  # names the file and the fix when it is missing or unsafe
        meta = checkpoint.embedded_meta(spec)
        enc = checkpoint.encoder_dir_for(spec)
        return cls(spec, state, meta, str(enc) if meta and meta.get("encoder_dir") and enc.is_dir() else None)

    def cleanup(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_settings(train: TrainConfig | dict | None, head: HeadSettings | dict | None) -> tuple[TrainConfig, HeadSettings]:
    """Every training and head setting of a run, defaults filled in and validated once.

    The CLI passes every flag, a deployment or a script only the ones it changes (Prefect has already
    turned its parameters into these dataclasses); both come out the same here, so a run gets the same
    training key and logs the same MLflow params whichever entry point started it.
    """
    train = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
    head = head if isinstance(head, HeadSettings) else HeadSettings(**(head or {}))
    return train, head


def head_config(settings: HeadSettings, source: Source | None, num_candidates: int, input_dim: int) -> HeadConfig:
    """Flags win; what they leave unset (None) comes from the warm-start checkpoint, then defaults."""
    given = settings.given()
    inherited = {}
    if source is not None and source.meta:
        old = source.meta.get("head_config", {})
        inherited = {k: old[k] for k in ("hidden_dim", "dropout", "num_buckets", "lexical_features") if k in old}
        # Branch widths carry over to a size that has those branches (large -> xlarge keeps branch 1).
        for i, k in enumerate(BRANCH_WIDTHS):
            if old.get(k) is not None and i < BRANCHES[settings.model_size]:
                inherited[k] = old[k]
    return HeadConfig(num_candidates=num_candidates, input_dim=input_dim, **{**inherited, **given})


def fit(
    db: str,
    table: str,
    version: int,
    train_cfg: TrainConfig,
    head_settings: HeadSettings,
    on_epoch=None,
    on_step=None,
    weights: str | None = None,
    state_path: str | None = None,
    resume: bool = False,
    progress: bool = False,
    logger=None,
) -> tuple[BucketHead, dict, dict]:
    """Train a head on ``table@version``; returns (head, meta, extras: validation ids and accuracy,
    the warm-start report, the table version the model pins, the fine-tuned encoder if any)."""
    rows = table_rows(db, table, version)
    source = Source.resolve(weights) if weights else None
    try:
        cands = Candidates.select(rows["responses"], rows["buckets"].tolist(), train_cfg.max_candidates_per_bucket)
        y_cand = cands.targets(rows["responses"], rows["buckets"].tolist())
        tr, va = split_indices(rows["responses"], rows["ids"], train_cfg.val_split, train_cfg.split_mode, train_cfg.seed, rows["parents"])
        cfg = head_config(head_settings, source, len(cands.texts), rows["vectors"].shape[1])
        encoder_start = None
        if train_cfg.train_all:
            # Start from the checkpoint's fine-tuned encoder when it has one, else from the table's.
            encoder_start = source.encoder_path if source and source.encoder_path else _table_encoder_path(db, rows["encoder"])
        elif source is not None and source.meta and source.meta.get("encoder", TORCH_ID) != rows["encoder"] and logger:
            logger.warning(
                "--weights %s was trained on vectors of encoder %s, this table holds %s: its tensors load, but expect it to need more training",
                source.spec,
                source.meta.get("encoder"),
                rows["encoder"],
            )

        def fresh(log: bool) -> tuple[Trainable, dict | None]:
            """What every run starts from: the seeded initial weights (the same data and seed give the
            same model), the warm start, and with train_all the encoder to fine-tune."""
            torch.manual_seed(train_cfg.seed)
            head = BucketHead(cfg, torch.tensor(cands.buckets), torch.tensor(cands.learned))
            report = None
            if source is not None:
                old_texts = (source.meta or {}).get("candidates", {}).get("texts")
                report = warm_start(head, source.state, old_texts, cands.texts)
                report["source"] = source.spec
                if log and logger:
                    logger.info(
                        "warm start from %s: %d tensors matched, %d remapped by response, %d new, %d skipped%s",
                        source.spec,
                        len(report["matched"]),
                        len(report["remapped"]),
                        len(report["new"]),
                        len(report["skipped"]),
                        "".join(f"\n  skipped {s}" for s in report["skipped"]),
                    )
            encoder = None
            if train_cfg.train_all:  # encoder_start None: the stock encoder
                from retrieval.trainable_encoder import TrainableEncoder

                encoder = TrainableEncoder(encoder_start, device=train_cfg.device)
            return Trainable(head, encoder), report

        model, report = fresh(log=True)
        hasher = model.head.hasher()
        counts = hasher.counts(rows["users"]) if hasher else None  # every row hashed once

        def lexical(head: BucketHead, idx: np.ndarray):
            """The rows' n-gram TF-IDF, with IDF from the rows ``idx`` trains on (validation stays unseen)."""
            if counts is None:
                return None
            head.lexical_idf.copy_(torch.from_numpy(hasher.idf(counts[idx])))
            return hasher.weigh(counts, head.lexical_idf.numpy())

        data = TrainData(
            rows["buckets"],
            y_cand,
            x=None if train_cfg.train_all else rows["vectors"],
            texts=rows["users"] if train_cfg.train_all else None,
            lex=lexical(model.head, tr),
        )
        result = train(
            model,
            data,
            train_idx=tr,
            val_idx=va,
            cfg=train_cfg,
            on_epoch=on_epoch,
            on_step=on_step,
            state_path=state_path,
            resume=resume,
            progress=progress,
        )
        # Held-out predictions of this run: the fallback thresholds, the score and the plots use them.
        log_pr = _log_probs(model, data, va)
        refit = None
        if result.config.refit and len(va):
            # Validation chose the epoch; now every row trains, from the same start, on the same
            # schedule, up to that epoch. The shipped model has seen all the data.
            everything = np.arange(len(rows["ids"]))
            if logger:
                logger.info(
                    "refit: training again on all %d rows (validation included) for the %d epoch(s) validation chose",
                    len(everything),
                    result.best_epoch,
                )
            model, _ = fresh(log=False)
            data.lex = lexical(model.head, everything)
            refit_state = f"{state_path}.refit" if state_path else None
            done = train(
                model,
                data,
                train_idx=everything,
                val_idx=None,
                cfg=result.config,
                on_epoch=_prefixed(on_epoch),
                on_step=_prefixed(on_step),
                state_path=refit_state,
                resume=bool(resume and refit_state and Path(refit_state).is_file()),
                progress=progress,
                until_epoch=result.best_epoch,
                label="refit",
            )
            refit = {"rows": int(len(everything)), "epochs": int(result.best_epoch), "examples_per_second": done.examples_per_second}
        head, encoder = model.head, model.encoder
    finally:
        if source is not None:
            source.cleanup()
    head.cpu().eval()
    pinned, encoder_id, saved_encoder = int(version), rows["encoder"], None
    if encoder is not None:
        # The table the model pins must hold vectors from the model's own encoder: write them as a
        # new table version, and keep the encoder beside the table for later builds and heads.
        encoder.cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            encoder_id = encoder.save(tmp)
            folder = encoder_folder(db, encoder_id)
            if not folder.is_dir():
                from models.atomic import atomic_dir

                with atomic_dir(folder) as dst:
                    shutil.copytree(tmp, dst, dirs_exist_ok=True)
        pinned = reembed_table(db, table, version, str(folder), encoder_id, progress=progress)
        saved_encoder = EncoderFolder(folder, encoder_id)
    elif encoder_id not in STOCK_IDS:
        saved_encoder = EncoderFolder(_table_encoder_path(db, encoder_id), encoder_id)
    y_va = torch.from_numpy(y_cand[va])
    # Promotion compares heads on their own answers (``right``, ``response_accuracy``); the calibration
    # and the report take what chat answers: the head with the neighbour vote of the training rows,
    # embedded as the pinned table holds them (retrieval/neighbours.py).
    right = answered_right(log_pr.argmax(1), y_va, head.candidate_learned)
    vectors = rows["vectors"] if pinned == int(version) else _vectors_by_id(db, table, pinned, rows["ids"])
    answer_log_pr = (
        torch.from_numpy(neighbour_log_probs(log_pr.numpy(), vectors[va], vectors[tr], y_cand[tr], train_cfg.neighbour_weight))
        if len(va)
        else log_pr
    )
    answer_acc = float(answered_right(answer_log_pr.argmax(1), y_va, head.candidate_learned).float().mean()) if len(va) else None
    best = result.history[result.best_epoch - 1]
    meta = {
        "encoder": encoder_id,
        "table": {
            "db": db_key(db),
            "name": table,
            "version": pinned,
            "trained_on_version": int(version),
            "data_version": data_version(rows),
        },
        "candidates": {"texts": cands.texts, "buckets": cands.buckets, "counts": cands.counts},
        "bucket_map": dict(sorted(set(zip(rows["groups"], rows["buckets"].tolist())))),
        "all_responses_learned": not cands.other,
        "calibration": {
            **(
                calibrate_thresholds(answer_log_pr, y_va, head.candidate_learned) if len(va) else {"min_confidence": 0.0, "min_margin": 0.0}
            ),
            "val_rows": int(len(va)),
        },
        "neighbours": {"weight": train_cfg.neighbour_weight, "k": NEIGHBOURS_K, "temperature": NEIGHBOURS_TEMPERATURE},
        # Validation scores are those of the held-out run, also when the shipped model is its refit.
        "metrics": {k: v for k, v in best.items() if k != "lr"}
        | {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "examples_per_second": result.examples_per_second}
        | ({"val_answer_acc": answer_acc} if answer_acc is not None else {})
        | ({"refit_rows": refit["rows"], "refit_epochs": refit["epochs"]} if refit else {}),
        "validation": {
            "rows": int(len(va)),
            "ids_digest": ids_digest([rows["ids"][i] for i in va]),
            "held_out_of_shipped_model": refit is None,
        },
        "refit": refit,
        "train_config": result.config.to_dict(),
        "warm_start": report,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    extras = {
        "ids": [rows["ids"][i] for i in va],
        "right": right.tolist(),
        "accuracy": best.get("val_response_acc"),
        "encoder": saved_encoder,
        "log_pr": answer_log_pr,
        "y_val": y_va,
        "buckets_val": rows["buckets"][va],
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    return head, meta, extras


def champion_score(
    weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str], val_right: list[bool] | None, val_acc: float
) -> tuple[float | None, float | None, str]:
    """(champion's score, challenger's score, on what) for a fair promotion decision.

    A refit champion trained on every row of its table version, validation rows included, so its
    score on those would be inflated. It is scored on the validation rows it never saw (new data),
    with the challenger's held-out answers (``val_right``) on the same rows; when it saw them all and
    both validated on the very same rows, the two held-out scores recorded at training are compared.
    (None, None, why) when no fair comparison exists. A champion that was not refit is scored on the
    whole validation set, as its own split held those rows out."""
    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    if not meta.get("refit"):
        return response_accuracy(weights, meta_path, db, table, version, val_ids), val_acc, f"{len(val_ids)} validation rows"
    src = meta.get("table", {})
    seen: set[str] = set()  # a table in another db or under another name: none of these rows
    if src.get("db") == db_key(db) and src.get("name") == table and src.get("trained_on_version") is not None:
        try:
            seen = set(read_columns(open_table(db, table, int(src["trained_on_version"])), ["id"])["id"].to_pylist())
        except ValueError:  # its version (or table) is gone, cleaned up: what it saw cannot be told
            seen = set(val_ids)
    unseen = [i for i in val_ids if i not in seen]
    if unseen and val_right is not None and len(val_right) == len(val_ids):
        right = dict(zip(val_ids, val_right))
        return (
            response_accuracy(weights, meta_path, db, table, version, unseen),
            float(np.mean([right[i] for i in unseen])),
            f"{len(unseen)} validation rows the refit champion never trained on",
        )
    recorded = meta.get("metrics", {}).get("val_response_acc")
    if meta.get("validation", {}).get("ids_digest") == ids_digest(val_ids) and recorded is not None:
        return float(recorded), val_acc, f"the same {len(val_ids)} validation rows, both held out at training"
    return None, None, f"it was refit on table version {src.get('trained_on_version')}"


def _log_probs(model: Trainable, data: TrainData, idx: np.ndarray) -> torch.Tensor:
    """log p(response) (len(idx), C) of rows ``idx`` under ``model`` as it is now, on the CPU."""
    from models.lexical import to_bag

    model.cpu().eval()
    with torch.no_grad():
        if not len(idx):
            return torch.zeros((0, model.head.cfg.num_candidates))
        x = torch.from_numpy(data.x[idx]) if model.encoder is None else model.encoder([data.texts[i] for i in idx])
        lex = to_bag(data.lex[idx]) if data.lex is not None and model.head.lexical is not None else None
        return model.head.response_log_probs(x, lex)[1]


def _vectors_by_id(db: str, table: str, version: int, ids: list[str]) -> np.ndarray:
    """The vectors of rows ``ids``, in that order, from ``table@version`` (a re-embedded version
    holds the same rows, not necessarily in the same order)."""
    other = table_rows(db, table, version)
    where = {i: n for n, i in enumerate(other["ids"])}
    return other["vectors"][[where[i] for i in ids]]


def _prefixed(callback):
    """``callback`` with every metric of the refit named ``refit_*`` (its epoch/step kept)."""
    if callback is None:
        return None
    return lambda row: callback({k if k in ("epoch", "step") else f"refit_{k}": v for k, v in row.items()})


def ids_digest(ids: list[str]) -> str:
    """A short hash of a set of row ids: two runs validated on the same rows iff these match."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _table_encoder_path(db: str, encoder_id: str) -> str | None:
    folder = encoder_folder(db, encoder_id)
    if folder is None:
        return None
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the table in {db!r} was embedded by fine-tuned encoder {encoder_id}, whose folder {str(folder)!r} is missing; rebuild the table with `bucketchat db build`"
        )
    return str(folder)


def response_accuracy(weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str]) -> float | None:
    """Response accuracy of any checkpoint on the given rows of ``table@version`` (its argmax
    candidate's text equals the row's response). The rows are embedded by the checkpoint's own
    encoder when it differs from the table's, so a fine-tuned model and a stock one compare fairly.
    None when there is nothing to compare on."""
    if not val_ids:
        return None
    rows = table_rows(db, table, version)
    where = {i: n for n, i in enumerate(rows["ids"])}
    idx = [where[i] for i in val_ids if i in where]
    head, meta = checkpoint.load(weights, meta_path)
    encoder = meta.get("encoder", TORCH_ID)  # metas without one predate the int8 encoder
    if encoder == rows["encoder"]:
        x = rows["vectors"][idx]
    elif encoder in STOCK_IDS or meta.get("encoder_path"):
        x = embed([rows["users"][i] for i in idx], path=meta.get("encoder_path"), encoder_id=encoder)
    else:
        return None
    if head.cfg.input_dim != x.shape[1]:
        return None
    with torch.no_grad():
        _, log_pr = head.response_log_probs(torch.from_numpy(x), head.lex([rows["users"][i] for i in idx]))
    texts = meta["candidates"]["texts"]  # None for an "other" slot: never equal to a response
    predicted = [texts[j] for j in log_pr.argmax(1).tolist()]
    return float(np.mean([p == rows["responses"][i] for p, i in zip(predicted, idx)]))


class MetricBuffer:
    """Collects metrics and sends them to MLflow in batches (``log_batch``, ≤ 1000 per call), not one
    request per value: per-step logging of a long run would otherwise dominate its wall time."""

    def __init__(self, run_id: str, every: int = 500):
        from mlflow import MlflowClient

        self.client, self.run_id, self.every, self.items = MlflowClient(), run_id, every, []

    def add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(dt.datetime.now().timestamp() * 1000)
        self.items += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.items) >= self.every:
            self.flush()

    def flush(self) -> None:
        while self.items:
            batch, self.items = self.items[:1000], self.items[1000:]
            self.client.log_batch(self.run_id, metrics=batch)


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
    progress: bool = False,
) -> dict:
    """Fit, log params/metrics/checkpoint/plots to MLflow, and write the local ``--output``/``--meta``.

    A resume state is written after every epoch beside ``output`` (``<output>.state``, or under the
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
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{size}-{table}-v{version}") as run:
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
            buffer.flush()
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
            progress=progress,
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
            mlflow.log_metrics({f"best_{k}": float(v) for k, v in meta_dict["metrics"].items()})
            mlflow.log_metrics({k: meta_dict["calibration"][k] for k in ("min_confidence", "min_margin")})
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


def _code_digest() -> str:
    """The training code itself: a change to it must retrain even on unchanged data."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*(root / "models").glob("*.py"), root / "tasks" / "training.py"]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def training_key(db: str, table: str, version: int, train: TrainConfig, head: HeadSettings) -> str | None:
    """What a trained model is a function of: the table's content, the settings and the code.

    None when the table version carries no content key (built before tables had one, or re-embedded
    by --train_all): such a run is never skipped.
    """
    content = (open_table(db, table, version).schema.metadata or {}).get(b"content")
    if not content:
        return None
    spec = {
        "db": db_key(db),
        "table": table,
        "content": content.decode(),
        "train": asdict(train),
        "head": asdict(head),
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


@task
def previous_training(
    db: str,
    table: str,
    version: int,
    train: TrainConfig | None,
    head: HeadSettings | None,
    outputs: list[str],
    model_name: str = registry.MODEL_NAME,
) -> dict:
    """This training's key, and the registered version already trained from exactly that key (newest)
    if there is one and the local ``outputs`` it wrote still exist: training again would only repeat
    the same work and register a duplicate."""
    key = training_key(db, table, version, *run_settings(train, head))
    found = registry.find_versions({"train_key": key}, model_name) if key else []
    if not found or not all(Path(p).exists() for p in outputs):
        return {"key": key, "previous": None}
    v = found[0]
    reason = f"unchanged: v{v['version']} was already trained on this table content with these settings and this code; nothing trained, champion kept"
    run_logger().info(reason)
    return {
        "key": key,
        "previous": {
            "version": v["version"],
            "run_id": v["run_id"],
            "val_response_acc": v["val_response_acc"],
            "reason": reason,
            "champion": registry.champion_version(model_name),
        },
    }


# A challenger sharing less than this with the champion's responses looks like another bot (a
# second team's data, a quick experiment): the champion then scores ~0 on its validation rows, so
# "better on validation" would always hold and say nothing.
MIN_SHARED_RESPONSES = 0.5


def shared_responses(meta_a: dict, meta_b: dict) -> float:
    """The share of responses two models have in common, over the smaller set (1.0 when one bot's
    responses all appear in the other's: grown data of the same bot), compared after case,
    whitespace and Unicode normalisation."""
    from conversations.dataset import normalise

    a, b = ({normalise(t) for t in m["candidates"]["texts"] if t is not None} for m in (meta_a, meta_b))
    return len(a & b) / min(len(a), len(b)) if a and b else 0.0


@task(**IO_RETRIES)  # registry writes are I/O against the tracking store; registering is idempotent
def register_and_promote(
    run_id: str,
    db: str,
    table: str,
    version: int,
    val_ids: list[str],
    val_response_acc: float | None,
    train_key: str | None = None,
    val_right: list[bool] | None = None,
    model_name: str = registry.MODEL_NAME,
    replace_champion: bool = False,
) -> dict:
    """Register the run's model as a version of the bot ``model_name``; move its ``champion`` to it
    only if it beats the current champion on validation rows neither has trained on
    (``champion_score``) and shares at least ``MIN_SHARED_RESPONSES`` of its responses with it
    (``replace_champion`` lifts that check). Returns the new version, whether it was promoted, and why.
    """
    logger = run_logger()
    tags = {
        "val_response_acc": f"{val_response_acc:.6f}" if val_response_acc is not None else "n/a",
        "table_version": str(version),
        **({"train_key": train_key} if train_key else {}),
    }
    new_version = registry.register(run_id, tags, model_name)
    current = registry.champion_version(model_name)
    champion_acc, challenger_acc, basis, shared = None, val_response_acc, "its validation rows", None
    if current is not None and current != new_version:
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta = registry.download_model(f"models:/{model_name}/{current}", Path(tmp) / "champion")
            _, new_meta = registry.download_model(f"runs:/{run_id}/{registry.MODEL_ARTIFACT}", Path(tmp) / "challenger")
            shared = shared_responses(json.loads(Path(meta).read_text()), json.loads(Path(new_meta).read_text()))
            if val_response_acc is not None:
                champion_acc, challenger_acc, basis = champion_score(
                    str(weights), str(meta), db, table, version, val_ids, val_right, val_response_acc
                )
    if current is None:
        promoted, reason = True, "no champion yet"
    elif current == new_version:
        promoted, reason = True, "already champion (a retry of this registration)"
    elif shared < MIN_SHARED_RESPONSES and not replace_champion:
        promoted, reason = (
            False,
            (
                f"it shares {shared:.0%} of its responses with champion v{current} (under {MIN_SHARED_RESPONSES:.0%}), so it looks like another bot; champion kept. "
                f"Train it under its own --model_name, or pass --replace_champion if it is meant to take over"
            ),
        )
    elif val_response_acc is None:
        promoted, reason = False, "no validation rows to compare on (raise --val_split); champion kept"
    elif champion_acc is None and challenger_acc is None:
        promoted, reason = (
            False,
            f"champion v{current} trained on every validation row of this run ({basis}), so no fair comparison exists; champion kept (`bucketchat registry rollback --version {new_version}` promotes this one by hand)",
        )
    elif champion_acc is None:
        promoted, reason = True, "the champion cannot be scored on this validation set"
    elif challenger_acc > champion_acc:
        promoted, reason = True, f"validation response accuracy {challenger_acc:.4f} > champion v{current}'s {champion_acc:.4f} on {basis}"
    else:
        # Only a better score moves the alias: an equal one is noise, and churn has a cost (caches, audits).
        promoted, reason = (
            False,
            f"validation response accuracy {challenger_acc:.4f} is not above champion v{current}'s {champion_acc:.4f} on {basis}; champion kept",
        )
    if promoted and shared is not None and shared < MIN_SHARED_RESPONSES:
        reason += f" (replaces another bot's champion: {shared:.0%} of responses shared; --replace_champion)"
    failpoint("registry:registered")
    registry.tag_version(
        new_version,
        {
            "champion_val_acc_at_registration": f"{champion_acc:.6f}" if champion_acc is not None else "n/a",
            "shared_responses_with_champion": f"{shared:.4f}" if shared is not None else "n/a",
            "promotion": reason,
        },
        model_name,
    )
    if promoted:
        failpoint("registry:promoting")
        registry.set_champion(new_version, model_name)
    logger.info("%s version %d: %s", model_name, new_version, reason)
    return {
        "version": new_version,
        "promoted": promoted,
        "reason": reason,
        "previous_champion": current,
        "champion_val_acc": champion_acc,
        "shared_responses": shared,
    }
