"""The fallback's thresholds, chosen on validation: how confident and how far ahead of the
runner-up an answer must be, so that few right answers fall back."""

from __future__ import annotations

import math

import torch


def answered_right(pred: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Whether each predicted candidate is the row's own learned response: an "other" slot names no
    response, so it never counts as right."""
    return (pred == y_cand) & learned[pred]


def calibrate_thresholds(log_pr: torch.Tensor, y_cand: torch.Tensor, learned: torch.Tensor, keep: float = 0.99) -> dict[str, float]:
    """Fallback thresholds on confidence and on margin (confidence minus the runner-up's
    probability), with a split-conformal guarantee: a new in-scope message whose answer would be
    right falls back with probability at most ``1 - keep`` (1 % by default).

    Each threshold takes half of that budget (union bound): it is the k-th smallest value among
    correct validation answers, k = floor((n + 1) * (1 - keep) / 2). Confidence catches messages the
    head finds unfamiliar; margin catches those torn between two responses (out-of-scope messages
    often land between two intents with a middling confidence).

    With too few correct answers for that k (n < 199 at 1 %) nothing can promise it: small validation
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
    k = int(math.floor((len(conf_ok) + 1) * (1.0 - keep) / 2))
    if k < 1:
        return {"min_confidence": float(conf_ok[0]) * SMALL_VALIDATION_MARGIN, "min_margin": 0.0}
    return {"min_confidence": float(conf_ok[k - 1]), "min_margin": float(margin_ok[k - 1])}


SMALL_VALIDATION_MARGIN = 0.5  # see calibrate_thresholds
