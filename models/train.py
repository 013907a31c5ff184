"""The training loop: plain torch over precomputed sentence embeddings (or, with ``train_all``, over
texts through the encoder being fine-tuned). No tracking in here: the caller gets metrics through
``on_step`` / ``on_epoch`` and logs them where it likes.

Each epoch can write a resume state (model, optimizer, scheduler, EMA shadow, sampler and dropout
RNG, history, best-so-far); ``resume=True`` continues from it to the same result an uninterrupted
run reaches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel
from torch.profiler import record_function

from models import progress
from models.atomic import failpoint
from models.calibration import answered_right
from models.config import TrainConfig
from models.fast import LazyAdam
from models.heads import BucketHead
from models.losses import adaptive_weights, pref_weight_at, preference_loss, sample_negatives
from models.state import STATE_EVERY_S, StateWriter, load_state


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base rate at optimizer step ``step``: linear warm-up, then the schedule."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        if schedule == "linear":
            return 1.0 - done
        return 1.0

    return f


class EMA:
    """Exponential moving average of a model's parameters: torch's ``AveragedModel`` with a warm-up on
    the decay, d = min(decay, (1 + n) / (10 + n)) at update n, so that a 0.999 shadow of a short run is
    not still mostly its first weights (torch's ``get_ema_multi_avg_fn`` has a fixed decay). The first
    update copies the weights, as ``AveragedModel`` does."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)

    def _average(self, shadow: list[torch.Tensor], live: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(shadow, live, 1.0 - self.rate(int(num_averaged)))

    def rate(self, updates: int | None = None) -> float:
        n = int(self.averaged.n_averaged) if updates is None else updates
        return min(self.decay, (1 + n) / (10 + n))

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.averaged.module.named_parameters()}

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)

    def swap_in(self, model: nn.Module) -> dict:
        """Load the shadow into ``model``; returns the live weights to restore with ``load_state_dict``."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({**live, **{k: v.clone() for k, v in self.shadow.items()}})
        return live


@dataclass
class TrainData:
    """What the loop trains on: embeddings ``x`` (N, D) for a frozen encoder, or ``texts`` with
    ``train_all``; bucket and candidate targets (N,) int64 (candidate -1: none learned); ``lex``, the
    rows' hashed n-gram TF-IDF (scipy CSR) when the head has a lexical path."""

    y_bucket: np.ndarray
    y_cand: np.ndarray
    x: np.ndarray | None = None
    texts: list[str] | None = None
    lex: object | None = None


class Trainable(nn.Module):
    """The head, and with ``train_all`` the encoder in front of it (texts in, logits out)."""

    def __init__(self, head: BucketHead, encoder: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.encoder = encoder

    def inputs(self, data: TrainData, idx: torch.Tensor, cache: dict) -> tuple:
        """(embeddings, lexical bag or None) of rows ``idx``: the arguments of ``head(...)``."""
        lex = None
        if data.lex is not None and self.head.lexical is not None:
            from models.lexical import to_rows_bag

            lex = to_rows_bag(data.lex[idx.cpu().numpy()], idx.device)
        if self.encoder is None:
            return cache["X"][idx], lex
        return self.encoder([data.texts[i] for i in idx.tolist()]), lex


def batch_loss(
    head: BucketHead,
    out: tuple[torch.Tensor, torch.Tensor],
    yb: torch.Tensor,
    yc: torch.Tensor,
    cfg: TrainConfig,
    pref_w: float,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bucket cross-entropy + response NLL within the gold bucket (+ w(t) * preference loss).

    The preference loss (models/losses.py) compares the gold bucket with sampled wrong buckets, and
    the gold response's score log p(b) + log p(r|b) with sampled wrong learned responses: the latter
    is what the user sees, so confusable *responses* are pushed apart too."""
    bucket_logits, cand_logits = out
    ce = F.cross_entropy(bucket_logits, yb, label_smoothing=cfg.label_smoothing)
    has = yc >= 0
    within = head.within_bucket_log_probs(cand_logits)
    # The rows with a learned response. Usually that is every row: then no boolean selection (its
    # index_put backward is a costly part of the loss step).
    if bool(has.all()):
        logits_r, within_r, y_r = bucket_logits, within, yc
    else:
        logits_r, within_r, y_r = bucket_logits[has], within[has], yc[has]
    any_has = len(y_r) > 0
    resp = -within_r.gather(1, y_r[:, None]).mean() if any_has else ce * 0.0
    parts = {"ce": float(ce.detach()), "response_nll": float(resp.detach())}
    loss = ce + resp
    if pref_w > 0:
        w = adaptive_weights(bucket_logits, yb) if cfg.adaptive_pref_weighting else None
        neg, real = sample_negatives(bucket_logits, yb, cfg.pref_group_size, cfg.hard_negative_ratio, gen)
        pref = preference_loss(
            bucket_logits, yb, neg, cfg.pref_beta, cfg.pref_objective, cfg.pref_group_estimator, cfg.pref_margin, w, real
        )
        if any_has:
            scores = head.response_scores(F.log_softmax(logits_r, dim=-1), within_r)
            valid = head.candidate_learned[None].expand_as(scores)
            wr = adaptive_weights(scores, y_r) if cfg.adaptive_pref_weighting else None
            neg, real = sample_negatives(scores, y_r, cfg.pref_group_size, cfg.hard_negative_ratio, gen, valid=valid)
            pref = pref + preference_loss(
                scores, y_r, neg, cfg.pref_beta, cfg.pref_objective, cfg.pref_group_estimator, cfg.pref_margin, wr, real
            )
        parts["pref"] = float(pref.detach())
        loss = loss + pref_w * pref
    return loss, parts


@torch.no_grad()
def validation_metrics(
    model: Trainable, data: TrainData, idx: torch.Tensor, cache: dict, cfg: TrainConfig, chunk: int = 2048
) -> dict[str, float]:
    """Validation loss, bucket accuracy and response accuracy: the argmax is the row's own learned
    response (an "other" slot names no response, so it never counts as right)."""
    model.eval()
    head = model.head
    losses, bucket_ok, resp_ok = [], 0, 0
    for i in range(0, len(idx), chunk):
        b = idx[i : i + chunk]
        out = head(*model.inputs(data, b, cache))
        yb, yc = cache["YB"][b], cache["YC"][b]
        loss, _ = batch_loss(head, out, yb, yc, cfg, 0.0, None)
        losses.append(float(loss) * len(b))
        log_pb = F.log_softmax(out[0], dim=-1)
        log_pr = head.response_scores(log_pb, head.within_bucket_log_probs(out[1]))
        pred = log_pr.argmax(1)
        bucket_ok += int((log_pb.argmax(1) == yb).sum())
        resp_ok += int(answered_right(pred, yc, head.candidate_learned).sum())
    n = max(1, len(idx))
    return {"loss": sum(losses) / n, "bucket_acc": bucket_ok / n, "response_acc": resp_ok / n}


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool
    resumed_from_epoch: int = 0
    examples_per_second: float = 0.0
    config: TrainConfig | None = None  # with the automatic settings made concrete


def fingerprint(cfg: TrainConfig, train_idx: np.ndarray, data: TrainData, head: BucketHead | None = None) -> str:
    """What a resume state must match: the configs and the exact training rows and targets."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    if head is not None:
        h.update(json.dumps(head.cfg.to_dict(), sort_keys=True).encode())
    for arr in (train_idx, data.y_bucket, data.y_cand):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()


def train(
    model: Trainable | BucketHead,
    data: TrainData | np.ndarray,
    y_bucket: np.ndarray | None = None,
    y_cand: np.ndarray | None = None,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    cfg: TrainConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    state_path: str | Path | None = None,
    state_every_s: float = STATE_EVERY_S,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    until_epoch: int | None = None,
    label: str = "train",
) -> TrainResult:
    """Train and return the best state (highest validation response accuracy, then lowest validation
    loss; the last epoch without a validation set).

    ``model`` is a ``Trainable`` (or a bare head with ``data`` an (N, D) embedding array and the targets
    given separately). ``state_path``: write a resume state there after the first epoch and then every
    ``state_every_s`` seconds of training (``StateWriter``); ``resume``: continue from it. ``until_epoch``: the last epoch to run, on the
    schedule of ``cfg.epochs`` (a refit stops where the held-out run chose). ``stop_after_epoch`` ends
    the run early as a kill would (tests). ``label`` names the run in the progress bar and failpoints.
    """
    if isinstance(model, BucketHead):
        model = Trainable(model)
    if not isinstance(data, TrainData):
        data = TrainData(y_bucket=y_bucket, y_cand=y_cand, x=data)
    val_idx = np.zeros(0, dtype=np.int64) if val_idx is None else val_idx
    cfg = (cfg or TrainConfig()).resolve(len(train_idx), len(val_idx))
    last_epoch = cfg.epochs if until_epoch is None else max(1, min(cfg.epochs, until_epoch))
    dev = torch.device(cfg.device)
    model.to(dev)
    head = model.head
    cache = {"YB": torch.from_numpy(data.y_bucket.astype(np.int64)).to(dev), "YC": torch.from_numpy(data.y_cand.astype(np.int64)).to(dev)}
    if data.x is not None:
        cache["X"] = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)).to(dev)
    tr = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    va = torch.from_numpy(np.asarray(val_idx, dtype=np.int64))
    group = cfg.batch_size * cfg.grad_accum_steps  # examples per optimizer step
    steps_per_epoch = math.ceil(len(tr) / group)
    sparse = [head.lexical.weight] if head.lexical is not None else []
    groups = [{"params": [p for p in head.parameters() if p.requires_grad and not any(p is q for q in sparse)], "lr": cfg.lr}]
    if model.encoder is not None:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr, "weight_decay": 0.01})
    # fused: one kernel for all parameters instead of a Python loop over tensors.
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type in ("cpu", "cuda"))
    schedule = lr_lambda(cfg.lr_schedule, cfg.warmup_steps, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # The n-gram weights get sparse gradients: lazy Adam moves only the rows a batch touched.
    opt_lex = LazyAdam(sparse, lr=cfg.lexical_lr) if sparse else None
    sched_lex = torch.optim.lr_scheduler.LambdaLR(opt_lex, schedule) if opt_lex else None
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    mixed = cfg.precision == "bf16"
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if cfg.balanced_sampler:
        # Every bucket equally likely per draw; rows within a bucket equally likely.
        counts = torch.bincount(cache["YB"][tr.to(dev)].cpu(), minlength=head.cfg.num_buckets).float()
        weights = 1.0 / counts[cache["YB"][tr.to(dev)].cpu()]
    best, best_score, best_epoch, bad, history, step, start_epoch = None, (math.inf, math.inf), 0, 0, [], 0, 1
    fp = fingerprint(cfg, np.asarray(train_idx), data, head)
    state_path = Path(state_path) if state_path else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise FileNotFoundError(f"--resume: no resume state at {str(state_path)!r}; start the run without --resume")
        st = load_state(state_path)
        if st["fingerprint"] != fp:
            raise ValueError(
                f"--resume: the state at {str(state_path)!r} was written for other data or settings; rerun with the original flags, or without --resume"
            )
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if opt_lex is not None:
            opt_lex.load_state_dict(st["optimizer_lexical"])
            sched_lex.load_state_dict(st["scheduler_lexical"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        gen.set_state(st["sampler_rng"])
        torch.set_rng_state(st["torch_rng"])
        best, best_epoch, bad, step = st["best"], int(st["best_epoch"]), int(st["bad"]), int(st["step"])
        best_score = tuple(float(v) for v in st["best_score"].tolist())
        history = json.loads(st["history"])
        start_epoch = int(st["epoch"]) + 1
    resumed_from = start_epoch - 1
    stopped = bool(history) and cfg.early_stop_patience > 0 and bad >= cfg.early_stop_patience
    seen, seconds = 0, 0.0
    writer = StateWriter(state_path, state_every_s) if state_path is not None else None
    bar = progress.bar(last_epoch, "training" if label == "train" else label, "epoch", initial=start_epoch - 1)
    for epoch in range(start_epoch, last_epoch + 1):
        if stopped:
            break
        model.train()
        t0 = time.perf_counter()
        if cfg.balanced_sampler:
            order = tr[torch.multinomial(weights, len(tr), replacement=True, generator=gen)]
        else:
            order = tr[torch.randperm(len(tr), generator=gen)]
        order = order.to(dev)
        total, parts_sum = 0.0, Counter()
        for i in range(0, len(order), group):
            chunk = order[i : i + group]
            opt.zero_grad(set_to_none=True)
            if opt_lex is not None:
                opt_lex.zero_grad(set_to_none=True)
            pref_w = pref_weight_at(step, steps_per_epoch, cfg.pref_weight, cfg.pref_warmup_epochs)
            for j in range(0, len(chunk), cfg.batch_size):
                b = chunk[j : j + cfg.batch_size]
                # The record_function ranges name a step's parts for tests/bench/step.py (a few µs
                # each; nothing is recorded unless a profiler runs).
                with record_function("step.inputs"):
                    inputs = model.inputs(data, b, cache)
                with record_function("step.forward"), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed):
                    out = head(*inputs)
                if mixed:  # the losses (log-softmax, sigmoid) in float32
                    out = tuple(o.float() for o in out)
                with record_function("step.loss"):
                    loss, parts = batch_loss(head, out, cache["YB"][b], cache["YC"][b], cfg, pref_w, gen)
                with record_function("step.backward"):
                    # Weighted by size, the micro-batch losses add up to the whole group's mean loss.
                    (loss * (len(b) / len(chunk))).backward()
                total += loss.item() * len(b)
                parts_sum.update({k: v * len(b) for k, v in parts.items()})
            with record_function("step.optimizer"):
                opt.step()
                sched.step()
            if opt_lex is not None:
                with record_function("step.lexical_optimizer"):
                    opt_lex.step()
                    sched_lex.step()
            step += 1
            if ema is not None:
                ema.update(model)
            if on_step:
                on_step({"step": step, "loss": total / max(1, i + len(chunk)), "lr": sched.get_last_lr()[0], "pref_weight": pref_w})
        seconds += time.perf_counter() - t0
        seen += len(order)
        row = {
            "epoch": epoch,
            "train_loss": total / max(1, len(order)),
            "lr": sched.get_last_lr()[0],
            **{f"train_{k}": v / max(1, len(order)) for k, v in parts_sum.items()},
        }
        live = ema.swap_in(model) if ema is not None and cfg.ema_select else None
        if len(va):
            row.update({f"val_{k}": v for k, v in validation_metrics(model, data, va.to(dev), cache, cfg).items()})
        # Pick on what users see (response accuracy); loss only breaks ties. Without validation: latest.
        if not len(va) or cfg.select_metric == "last":
            score = (-epoch, 0.0)
        elif cfg.select_metric == "loss":
            score = (row["val_loss"], -row["val_response_acc"])
        else:
            score = (-row["val_response_acc"], row["val_loss"])
        if score < best_score:
            best, best_score, best_epoch, bad = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, score, epoch, 0
        else:
            bad += 1
            stopped = cfg.early_stop_patience > 0 and bad >= cfg.early_stop_patience
        if live is not None:
            model.load_state_dict(live)
        history.append(row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_response_acc") if k in row}, refresh=False)
        bar.update(1)
        if on_epoch:
            on_epoch(row)
        if writer is not None and writer.due():
            writer.save(
                {
                    "fingerprint": fp,
                    "epoch": epoch,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "optimizer_lexical": opt_lex.state_dict() if opt_lex else {},
                    "scheduler_lexical": sched_lex.state_dict() if sched_lex else {},
                    "ema": ema.state_dict() if ema else {},
                    "sampler_rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "best_score": torch.tensor(best_score, dtype=torch.float64),
                    "best_epoch": best_epoch,
                    "bad": bad,
                    "history": json.dumps(history),
                }
            )
        failpoint(f"{label}:epoch{epoch}")
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if writer is not None:
        writer.close()
    bar.close()
    model.load_state_dict(best)
    model.eval()
    return TrainResult(
        {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        best_epoch,
        history,
        stopped,
        resumed_from,
        seen / seconds if seconds else 0.0,
        cfg,
    )
