"""Fit a head on a pinned table version: read its rows, pick candidates, split, warm-start, train,
calibrate the fallback, and say what the model is (its meta). Plain torch and LanceDB: the task in
``tasks/training.py`` wraps it with MLflow."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import checkpoint
from models.calibration import answered_right, calibrate
from models.candidates import Candidates, split_indices
from models.config import BRANCH_WIDTHS, BRANCHES, HeadConfig, HeadSettings, TrainConfig
from models.heads import BucketHead, warm_start
from models.train import Trainable, TrainData, train
from retrieval.encoder import STOCK_IDS, TORCH_ID
from retrieval.locations import build_dir, db_key, encoder_folder, table_encoder_path
from retrieval.neighbours import TEMPERATURE as NEIGHBOURS_TEMPERATURE
from retrieval.neighbours import K as NEIGHBOURS_K
from retrieval.neighbours import mix, nearest, vote
from retrieval.store import reembed_table
from retrieval.table_rows import table_rows, vectors_by_id
from tasks import registry


def data_version(rows: dict) -> str:
    """A short content hash of the rows trained on (ids, responses, buckets): the MLflow data tag."""
    h = hashlib.sha256()
    for i, r, b in zip(rows["ids"], rows["responses"], rows["buckets"].tolist()):
        h.update(f"{i}\0{r}\0{b}\n".encode())
    return h.hexdigest()[:16]


def data_name(ids: list[str]) -> str:
    """What the rows came from, for people: the source files' names (every id starts with its
    source's), e.g. ``tickets+faq``; a long list is cut with how many more there are."""
    sources = sorted({i.split(":", 1)[0] for i in ids})
    shown = "+".join(sources[:3])
    return shown + (f"+{len(sources) - 3} more" if len(sources) > 3 else "")


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
    logger=None,
) -> tuple[BucketHead, dict, dict]:
    """Train a head on ``table@version``; returns (head, meta, extras: validation ids and accuracy,
    the warm-start report, the table version the model pins, the fine-tuned encoder if any)."""
    rows = table_rows(db, table, version)
    source = Source.resolve(weights) if weights else None
    try:
        cands = Candidates.select(rows["responses"], rows["buckets"].tolist(), train_cfg.max_candidates_per_bucket)
        y_cand = cands.targets(rows["responses"], rows["buckets"].tolist())
        tr, va = split_indices(
            rows["responses"],
            rows["ids"],
            train_cfg.val_split,
            train_cfg.split_mode,
            train_cfg.seed,
            rows["parents"],
            train_cfg.val_max_rows,
        )
        cfg = head_config(head_settings, source, len(cands.texts), rows["vectors"].shape[1])
        encoder_start = None
        if train_cfg.train_all:
            # Start from the checkpoint's fine-tuned encoder when it has one, else from the table's.
            encoder_start = source.encoder_path if source and source.encoder_path else table_encoder_path(db, rows["encoder"])
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
        scratch = build_dir(db)
        counts = hasher.counts(rows["users"], scratch) if hasher else None  # every row hashed once

        def lexical(head: BucketHead, idx: np.ndarray):
            """The rows' n-gram TF-IDF, with IDF from the rows ``idx`` trains on (validation stays unseen)."""
            if counts is None:
                return None
            head.lexical_idf.copy_(torch.from_numpy(hasher.idf(counts, idx)))
            return hasher.weigh(counts, head.lexical_idf.numpy(), scratch)

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
        )
        # Held-out predictions of this run: the fallback thresholds, the score and the plots use them.
        log_pr = validation_log_probs(model, data, va)
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
            data.lex = None  # the held-out run's features, before the refit's are weighed
            data.lex = lexical(model.head, everything)
            refit_state = f"{state_path}.refit" if state_path else None
            done = train(
                model,
                data,
                train_idx=everything,
                val_idx=None,
                cfg=result.config,
                on_epoch=prefixed(on_epoch),
                on_step=prefixed(on_step),
                state_path=refit_state,
                resume=bool(resume and refit_state and Path(refit_state).is_file()),
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
        pinned = reembed_table(db, table, version, str(folder), encoder_id)
        saved_encoder = EncoderFolder(folder, encoder_id)
    elif encoder_id not in STOCK_IDS:
        saved_encoder = EncoderFolder(table_encoder_path(db, encoder_id), encoder_id)
    y_va = torch.from_numpy(y_cand[va])
    # Promotion compares heads on their own answers (``right``, ``response_accuracy``); the calibration
    # and the report take what chat answers: the head with the neighbour vote of the training rows,
    # embedded as the pinned table holds them (retrieval/neighbours.py).
    right = answered_right(log_pr.argmax(1), y_va, head.candidate_learned)
    vectors = rows["vectors"] if pinned == int(version) else vectors_by_id(db, table, pinned, rows["ids"])
    # One exact search serves both: each validation row's nearest training rows, searched in place
    # (``among``) rather than copied out of the table's map (0.9x the vectors at 1M rows).
    cos = near = None
    if len(va) and len(tr):
        among = np.zeros(len(vectors), bool)
        among[tr] = True
        cos, near = nearest(np.asarray(vectors[va]), vectors, NEIGHBOURS_K, among=among)
    answer_log_pr = log_pr
    if cos is not None and train_cfg.neighbour_weight > 0:
        votes = vote(cos, y_cand[near], log_pr.shape[1], NEIGHBOURS_TEMPERATURE)
        answer_log_pr = torch.from_numpy(mix(log_pr.numpy(), votes, train_cfg.neighbour_weight))
    answer_acc = float(answered_right(answer_log_pr.argmax(1), y_va, head.candidate_learned).float().mean()) if len(va) else None
    # How like the training messages each validation message is: what chat sees for a new message
    # against the whole table.
    val_nearest = torch.from_numpy(cos[:, 0].copy()) if cos is not None else None
    best = result.history[result.best_epoch - 1]
    meta = {
        "encoder": encoder_id,
        "table": {
            "db": db_key(db),
            "name": table,
            "version": pinned,
            "trained_on_version": int(version),
            "data_version": data_version(rows),
            "data": data_name(rows["ids"]),
            "rows": len(rows["ids"]),
        },
        "candidates": {"texts": cands.texts, "buckets": cands.buckets, "counts": cands.counts},
        "bucket_map": dict(sorted(set(zip(rows["groups"], rows["buckets"].tolist())))),
        "all_responses_learned": not cands.other,
        "calibration": {
            **calibrate(answer_log_pr, y_va, head.candidate_learned, val_nearest, train_cfg.fallback_budget),
            "budget": train_cfg.fallback_budget,
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
        "examples": rows["users"][:3],  # the MLflow model's input example (tasks/registry.py)
    }
    return head, meta, extras


def validation_log_probs(model: Trainable, data: TrainData, idx: np.ndarray) -> torch.Tensor:
    """log p(response) (len(idx), C) of rows ``idx`` under ``model`` as it is now, on the CPU."""
    from models.lexical import to_bag

    model.cpu().eval()
    with torch.no_grad():
        if not len(idx):
            return torch.zeros((0, model.head.cfg.num_candidates))
        x = torch.from_numpy(data.x[idx]) if model.encoder is None else model.encoder([data.texts[i] for i in idx])
        lex = to_bag(data.lex[idx]) if data.lex is not None and model.head.lexical is not None else None
        return model.head.response_log_probs(x, lex)[1]


def prefixed(callback):
    """``callback`` with every metric of the refit named ``refit_*`` (its epoch/step kept)."""
    if callback is None:
        return None
    return lambda row: callback({k if k in ("epoch", "step") else f"refit_{k}": v for k, v in row.items()})


def ids_digest(ids: list[str]) -> str:
    """A short hash of a set of row ids: two runs validated on the same rows iff these match."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
