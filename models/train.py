"""The training loop: plain torch over precomputed sentence embeddings. No tracking in here; the
caller gets per-epoch metrics through ``on_epoch`` and logs them where it likes."""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from models.heads import BucketHead

SCHEDULES = ("cosine", "linear", "constant")
SPLIT_MODES = ("stratified", "random")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    val_split: float = 0.1
    split_mode: str = "stratified"
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    early_stop_patience: int = 6
    balanced_sampler: bool = False
    max_candidates_per_bucket: int = 256
    seed: int = 42
    device: str = "cpu"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "--epochs", self.epochs, "use 1 or more"),
            (self.batch_size >= 1, "--batch_size", self.batch_size, "use 1 or more"),
            (self.lr > 0, "--lr", self.lr, "use a positive learning rate such as 0.001"),
            (0.0 <= self.label_smoothing < 1.0, "--label_smoothing", self.label_smoothing, "use a value in [0, 1)"),
            (0.0 <= self.val_split < 1.0, "--val_split", self.val_split, "use a fraction in [0, 1), e.g. 0.1"),
            (self.split_mode in SPLIT_MODES, "--split_mode", self.split_mode, f"choose {' or '.join(SPLIT_MODES)}"),
            (self.lr_schedule in SCHEDULES, "--lr_schedule", self.lr_schedule, f"choose one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, "--warmup_steps", self.warmup_steps, "use 0 or more"),
            (self.early_stop_patience >= 0, "--early_stop_patience", self.early_stop_patience, "use 0 (off) or more"),
            (self.max_candidates_per_bucket >= 1, "--max_candidates_per_bucket", self.max_candidates_per_bucket, "use 1 or more"),
        ]
        for ok, flag, value, fix in checks:
            if not ok:
                raise ValueError(f"{flag}={value!r} is invalid: {fix}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidates:
    """The responses the head learns to score, grouped by bucket; the rest stay reachable by retrieval.

    A bucket whose responses do not all fit in ``max_per_bucket`` also gets an *other* slot (text
    ``None``), trained on the rows whose response was left out. At answer time the responses that
    retrieval finds in that bucket share the slot's probability, so they compete fairly with the
    learned ones instead of being drowned by them.
    """

    texts: list[str | None]
    buckets: list[int]
    counts: list[int]
    index: dict[str, int] = field(repr=False)  # response text -> candidate id
    other: dict[int, int] = field(repr=False)  # bucket -> id of its "other" slot

    @classmethod
    def select(cls, responses: list[str], buckets: list[int], max_per_bucket: int) -> "Candidates":
        """The ``max_per_bucket`` most frequent responses of each bucket (ties: first seen)."""
        freq = Counter(zip(responses, buckets))
        first: dict = {}
        for i, key in enumerate(zip(responses, buckets)):
            first.setdefault(key, i)
        per_bucket: dict[int, list] = {}
        for (text, b), n in freq.items():
            per_bucket.setdefault(b, []).append((-n, first[(text, b)], text))
        texts: list[str | None] = []
        bks, counts, index = [], [], {}
        left_out: Counter = Counter()
        for b in sorted(per_bucket):
            ranked = sorted(per_bucket[b])
            for neg, _, text in ranked[:max_per_bucket]:
                if text not in index:  # a response in two buckets is learned once, in the commoner one
                    index[text] = len(texts)
                    texts.append(text)
                    bks.append(b)
                    counts.append(-neg)
            left_out[b] += sum(-neg for neg, _, text in ranked[max_per_bucket:] if text not in index)
        other = {}
        for b, n in sorted(left_out.items()):
            if n:
                other[b] = len(texts)
                texts.append(None)
                bks.append(b)
                counts.append(n)
        return cls(texts, bks, counts, index, other)

    @property
    def learned(self) -> list[bool]:
        return [t is not None for t in self.texts]

    def targets(self, responses: list[str], buckets: list[int]) -> np.ndarray:
        """Candidate id per row: its response, else its bucket's other slot, else -1."""
        return np.array([self.index.get(r, self.other.get(b, -1)) for r, b in zip(responses, buckets)], dtype=np.int64)


def split_indices(keys: list[str], ids: list[str], val_split: float, mode: str, seed: int, families: list[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val split that depends on the rows, not their order.

    Rows split by *family*: a synthetic variant belongs to its parent's family (``families[i]`` is the
    parent id, or None for an original). A held-out family contributes only its original row to
    validation, and its variants go nowhere: a variant of a training row in validation would make
    validation easy and the calibrated fallback threshold far too strict.

    ``stratified``: within each key (response), the families whose hashed id sorts first are held
    out, ``round(n * val_split)`` of them, and a key with one family stays in training (a response
    never seen in training cannot be learned). ``random``: each family by its hash alone. The same
    data therefore gets the same validation set on every run, which keeps champion comparisons fair.
    """
    def h(s: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big")

    fam = [f or i for f, i in zip(families or [None] * len(ids), ids)]
    held: set[str] = set()
    if val_split > 0:
        if mode == "random":
            held = {f for f in set(fam) if h(f) / 2**64 < val_split}
        else:
            by_key: dict[str, set[str]] = {}
            for key, f in zip(keys, fam):
                by_key.setdefault(key, set()).add(f)
            for group in by_key.values():
                take = int(round(len(group) * val_split)) if len(group) > 1 else 0
                held.update(sorted(group, key=h)[: min(take, len(group) - 1)])
    in_val = np.array([f in held for f in fam], dtype=bool)
    original = np.array([f == i for f, i in zip(fam, ids)], dtype=bool)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val & original)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return f


def loss_fn(head: BucketHead, x: torch.Tensor, y_bucket: torch.Tensor, y_cand: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Bucket cross-entropy + response NLL within the gold bucket (rows with a learned candidate)."""
    bucket_logits, cand_logits = head(x)
    loss = F.cross_entropy(bucket_logits, y_bucket, label_smoothing=label_smoothing)
    has = y_cand >= 0
    if has.any():
        within = head.within_bucket_log_probs(cand_logits[has])  # (B', C)
        loss = loss - within.gather(1, y_cand[has, None]).mean()
    return loss


@torch.no_grad()
def evaluate(head: BucketHead, x: torch.Tensor, y_bucket: torch.Tensor, y_cand: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, float]:
    """Validation loss, bucket accuracy and response accuracy: the argmax is the row's own learned
    response (an "other" slot names no response, so it never counts as right)."""
    head.eval()
    log_pb, log_pr = head.response_log_probs(x)
    pred = log_pr.argmax(1)
    return {
        "loss": float(loss_fn(head, x, y_bucket, y_cand, label_smoothing)),
        "bucket_acc": float((log_pb.argmax(1) == y_bucket).float().mean()),
        "response_acc": float(((pred == y_cand) & head.candidate_learned[pred]).float().mean()),
    }


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool


def train(head: BucketHead, x: np.ndarray, y_bucket: np.ndarray, y_cand: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``head`` and return the best state (highest validation response accuracy, then lowest
    validation loss; the last one without a validation set). ``x`` (N, D) float32 embeddings; ``y_bucket``, ``y_cand`` (N,) int64 targets."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    head.to(dev)
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    YB = torch.from_numpy(y_bucket.astype(np.int64)).to(dev)
    YC = torch.from_numpy(y_cand.astype(np.int64)).to(dev)
    tr = torch.from_numpy(train_idx).to(dev)
    va = torch.from_numpy(val_idx).to(dev)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, steps_per_epoch * cfg.epochs))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if cfg.balanced_sampler:
        counts = torch.bincount(YB[tr], minlength=head.cfg.num_buckets).float()
        weights = (1.0 / counts[YB[tr]]).cpu()
    best, best_score, best_epoch, bad, history, stopped = None, (math.inf, math.inf), 0, 0, [], False
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        if cfg.balanced_sampler:
            order = tr[torch.multinomial(weights, len(tr), replacement=True, generator=gen).to(dev)]
        else:
            order = tr[torch.randperm(len(tr), generator=gen).to(dev)]
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            loss = loss_fn(head, X[b], YB[b], YC[b], cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        row = {"epoch": epoch, "train_loss": total / max(1, len(order)), "lr": sched.get_last_lr()[0]}
        if len(va):
            row.update({f"val_{k}": v for k, v in evaluate(head, X[va], YB[va], YC[va], cfg.label_smoothing).items()})
        history.append(row)
        if on_epoch:
            on_epoch(row)
        # Pick on what users see (response accuracy); loss only breaks ties. Without validation: latest.
        score = (-row["val_response_acc"], row["val_loss"]) if len(va) else (-epoch, 0.0)
        if score < best_score:
            best, best_score, best_epoch, bad = copy.deepcopy(head.state_dict()), score, epoch, 0
        else:
            bad += 1
            if cfg.early_stop_patience and bad >= cfg.early_stop_patience:
                stopped = True
                break
    head.load_state_dict(best)
    return TrainResult({k: v.detach().cpu() for k, v in best.items()}, best_epoch, history, stopped)


def calibrate_min_confidence(log_pr: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor, keep: float = 0.99) -> float:
    """Fallback threshold: the confidence below which only ``1 - keep`` of *correct* validation answers
    fall. Without out-of-scope examples this is the honest knob: it bounds the in-scope accuracy that
    falling back may cost (1 % by default) and rejects whatever is less sure than that."""
    conf, pred = log_pr.exp().max(dim=1)
    correct = conf[(pred == y_cand) & learned[pred]]
    if len(correct) == 0:
        return 0.0
    return float(torch.quantile(correct, 1.0 - keep))
