"""The fallback's thresholds, chosen on validation: how confident and how far ahead of the
runner-up an answer must be, and how close to a stored message the question must be, so that few
right answers fall back."""

from __future__ import annotations

import math

import torch


def calibrate(
    log_pr: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor, nearest: torch.Tensor | None, budget: float
) -> dict[str, float]:
    """All three thresholds for a ``budget`` (``TrainConfig.fallback_budget``): the share of right
    answers the fallback may cost. Half goes to the similarity gate (the one that catches questions
    from outside the bot's world), half to confidence and margin. What a user loses in right answers
    is the budget, whatever the data; what the gates then catch is measured (tests/bench/oos.py).
    ``nearest``: each validation message's similarity to its nearest training message (None: no
    training rows to compare with)."""
    if budget <= 0 or len(y_cand) == 0:
        return {"min_confidence": 0.0, "min_margin": 0.0, "min_similarity": 0.0}
    keep = 1.0 - budget / 2
    right = answered_right(log_pr.argmax(1), y_cand, learned)
    return {
        **calibrate_thresholds(log_pr, y_cand, learned, keep),
        "min_similarity": calibrate_similarity(nearest, right, keep) if nearest is not None else 0.0,
    }


def answered_right(pred: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Whether each predicted candidate is the row's own learned response: an "other" slot names no
    response, so it never counts as right."""
    return (pred == y_cand) & learned[pred]


def calibrate_thresholds(log_pr: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor, keep: float = 0.9975) -> dict[str, float]:
    """Fallback thresholds on confidence and on margin (confidence minus the runner-up's
    probability), with a split-conformal guarantee: a new in-scope message whose answer would be
    right falls back with probability at most ``1 - keep`` (0.25 % by default).

    Each threshold takes half of that budget (union bound): it is the k-th smallest value among
    correct validation answers, k = floor((n + 1) * (1 - keep) / 2). Confidence catches messages the
    head finds unfamiliar; margin catches those torn between two responses (out-of-scope messages
    often land between two intents with a middling confidence).

    With too few correct answers for that k (n < 799 at 0.25 %) nothing can promise it: small validation
    sets get half the least confidence among right answers (only what is far less sure than anything
    right falls back) and no margin gate. It bounds nothing statistically; `bucketchat eval --oos`
    measures it. The runs behind this rule: BENCHMARKS.md, "Trials behind the defaults: the fallback".
    """
    probs = log_pr.exp()
    top2 = probs.topk(min(2, probs.shape[1]), dim=1)
    conf, pred = top2.values[:, 0], top2.indices[:, 0]
    margin = conf - (top2.values[:, 1] if probs.shape[1] > 1 else 0.0)
    right = answered_right(pred, y_cand, learned)
    conf_ok, margin_ok = torch.sort(conf[right]).values, torch.sort(margin[right]).values
    if len(conf_ok) == 0:
        return {"min_confidence": 0.0, "min_margin": 0.0}
    k = int(math.floor((len(conf_ok) + 1) * (1.0 - keep) / 2 + 1e-9))  # 1e-9: 1 - 0.9975 is not exact in floats
    if k < 1:
        return {"min_confidence": float(conf_ok[0]) * SMALL_VALIDATION_MARGIN, "min_margin": 0.0}
    return {"min_confidence": float(conf_ok[k - 1]), "min_margin": float(margin_ok[k - 1])}


SMALL_VALIDATION_MARGIN = 0.5  # see calibrate_thresholds


def calibrate_similarity(nearest: torch.Tensor, right: torch.Tensor, keep: float = 0.9975) -> float:
    """The least cosine similarity between a message and its nearest stored message that still gets
    an answer: below it, the question is unlike anything the bot was trained on (a general question
    to a support bot) and falls back whatever the head says.

    ``nearest``: each validation message's similarity to its nearest *training* message; ``right``:
    whether its answer was right. Split-conformal as ``calibrate_thresholds``: a new in-scope message
    whose answer would be right falls back with probability at most ``1 - keep`` (0.25 %), the k-th
    smallest similarity among right answers, k = floor((n + 1) * (1 - keep)). The softmax gates
    cannot see such questions: a head is as sure of "who won the world cup in 1954?" as of a real
    one, because its classes tile the whole space (tests/bench/oos_scores.py measures each score).

    With too few right answers for that k, half the least similarity among them: only what is far
    less like the data than anything answered right falls back.
    """
    ok = torch.sort(nearest[right]).values
    if len(ok) == 0:
        return 0.0
    k = int(math.floor((len(ok) + 1) * (1.0 - keep) + 1e-9))
    return max(0.0, float(ok[k - 1]) if k >= 1 else float(ok[0]) * SMALL_VALIDATION_MARGIN)
