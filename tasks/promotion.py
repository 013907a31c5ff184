"""Whether a trained model becomes the bot's champion, and whether it needs training at all: the
training key (table content, settings, code), the champion scored on the challenger's validation rows,
and the promotion itself, safe to retry (one registered version per run)."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import task

from models import checkpoint
from models.atomic import failpoint
from models.config import HeadSettings, TrainConfig, run_settings
from retrieval.encoder import STOCK_IDS, TORCH_ID, embed
from retrieval.locations import db_key
from retrieval.store import open_table, read_columns
from retrieval.table_rows import table_rows
from tasks import registry, run_logger
from tasks.fitting import ids_digest
from tasks.retries import IO_RETRIES


def response_accuracy(weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str]) -> float | None:
    """Response accuracy of any checkpoint on the given rows of ``table@version`` (its argmax
    candidate's text equals the row's response). The rows are embedded by the checkpoint's own
    encoder when it differs from the table's, so a fine-tuned model and a stock one compare fairly.
    None when there is nothing to compare on."""
    right = answers(weights, meta_path, db, table, version, val_ids)
    return float(np.mean(list(right.values()))) if right else None


def answers(weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str]) -> dict[str, bool] | None:
    """Whether the checkpoint answers each of the given rows right (row id -> bool; rows no longer
    in the table are left out); None when there is nothing to compare on."""
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
    return {rows["ids"][i]: p == rows["responses"][i] for p, i in zip(predicted, idx)}


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
    unseen = unseen_rows(meta, db, table, val_ids)
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
    return None, None, f"it was refit on table version {meta.get('table', {}).get('trained_on_version')}"


def unseen_rows(meta: dict, db: str, table: str, val_ids: list[str]) -> list[str]:
    """The validation rows a champion never trained on: all of them unless it was refit on every
    row of its table version (then those not in that version)."""
    if not meta.get("refit"):
        return list(val_ids)
    src = meta.get("table", {})
    seen: set[str] = set()  # a table in another db or under another name: none of these rows
    if src.get("db") == db_key(db) and src.get("name") == table and src.get("trained_on_version") is not None:
        try:
            seen = set(read_columns(open_table(db, table, int(src["trained_on_version"])), ["id"])["id"].to_pylist())
        except ValueError:  # its version (or table) is gone, cleaned up: what it saw cannot be told
            seen = set(val_ids)
    return [i for i in val_ids if i not in seen]


# One-sided 95 %: a challenger more wrong than this many standard deviations of the paired
# differences is measurably worse (a sign test on the rows where the two disagree).
WORSE_Z = 1.645


def coverage_gain(weights: str, meta_path: str, db: str, table: str, version: int, val_ids: list[str], val_right: list[bool]) -> str | None:
    """Why a challenger that is not strictly more accurate is still the better bot, or None.

    A retrain that adds a topic (reviewed turns: `bucketchat review`) gains a few validation rows
    the champion cannot answer, as it never learned their response, while retraining moves the
    rest by noise; "strictly more accurate" then turns on a row or two either way. So: the
    challenger answers right at least one row whose response the champion never learned, and on
    the rows whose responses it did learn the challenger is not measurably worse (a paired sign
    test on the rows where the two disagree)."""
    meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    ids = set(unseen_rows(meta, db, table, val_ids))
    mine = {i: r for i, r in zip(val_ids, val_right) if i in ids}
    theirs = answers(weights, meta_path, db, table, version, list(mine))
    if not theirs:
        return None
    from conversations.dataset import normalise

    rows = read_columns(open_table(db, table, version), ["id", "assistant"])
    response = {i: r for i, r in zip(rows["id"].to_pylist(), rows["assistant"].to_pylist()) if i in theirs}
    known = {normalise(t) for t in meta["candidates"]["texts"] if t is not None}
    new = [i for i in theirs if normalise(response[i]) not in known]
    gained = sum(mine[i] for i in new)
    old = [i for i in theirs if normalise(response[i]) in known]
    better = sum(mine[i] and not theirs[i] for i in old)
    worse = sum(theirs[i] and not mine[i] for i in old)
    if gained == 0 or worse - better > WORSE_Z * math.sqrt(better + worse):
        return None
    return (
        f"it answers {gained} of {len(new)} validation rows whose response the champion never learned, "
        f"and on the other {len(old)} it is not measurably worse ({worse} answers lost, {better} won)"
    )


def code_digest() -> str:
    """The training code itself: a change to it must retrain even on unchanged data."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*(root / "models").glob("*.py"), root / "tasks" / "fitting.py", root / "tasks" / "training.py"]):
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
        "code": code_digest(),
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
    champion_acc, challenger_acc, basis, shared, gain = None, val_response_acc, "its validation rows", None, None
    if current is not None and current != new_version:
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta = registry.download_model(f"models:/{model_name}/{current}", Path(tmp) / "champion")
            _, new_meta = registry.download_model(f"runs:/{run_id}/{registry.MODEL_ARTIFACT}", Path(tmp) / "challenger")
            shared = shared_responses(json.loads(Path(meta).read_text()), json.loads(Path(new_meta).read_text()))
            if val_response_acc is not None:
                champion_acc, challenger_acc, basis = champion_score(
                    str(weights), str(meta), db, table, version, val_ids, val_right, val_response_acc
                )
                # Not strictly more accurate: it may still be better by what it learned (while the champion's files are here).
                if champion_acc is not None and challenger_acc is not None and challenger_acc <= champion_acc and val_right is not None:
                    gain = coverage_gain(str(weights), str(meta), db, table, version, val_ids, val_right)
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
    elif gain:
        promoted, reason = (
            True,
            f"{gain} (validation response accuracy {challenger_acc:.4f}, champion v{current}'s {champion_acc:.4f} on {basis})",
        )
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
        # Chat's next start then finds the champion's files in its local cache (registry.py).
        try:
            registry.download_model(f"models:/{model_name}/{new_version}")
        except (OSError, ValueError) as exc:  # only a slower first chat; the model is registered
            logger.warning("could not copy %s v%d to the local model cache: %s", model_name, new_version, exc)
    logger.info("%s version %d: %s", model_name, new_version, reason)
    return {
        "version": new_version,
        "promoted": promoted,
        "reason": reason,
        "previous_champion": current,
        "champion_val_acc": champion_acc,
        "shared_responses": shared,
    }
