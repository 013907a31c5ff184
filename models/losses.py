"""Losses on logits z (B, K), gold class y (B,) and sampled negatives (DESIGN.md §3).

    cross-entropy        F.cross_entropy(z, y, label_smoothing)
    sigmoid (DPO-style)  mean_j  -log sigmoid(beta * (z_y - z_j))
    repo_relu (RePO)     mean_j  max(0, margin - beta * (z_y - z_j))          arXiv 2503.07426
    group estimator epo  z_j above is replaced by E_{j ~ softmax(z_N)}[z_j], the expectation of the
                         group's logits under the model's own distribution over that group (EPO):
                         one comparison per group, weighted toward the negatives the model confuses.

The negatives: with probability ``hard_ratio`` an example takes the highest-scoring wrong classes
(hard negatives), otherwise wrong classes drawn uniformly. The total is CE + w(t) * pref, with w ramped
linearly over the warm-up (``pref_weight_at``); adaptive weighting scales each example's preference term
by 1 - p_y (detached, normalised to mean 1), so examples already separated stop pulling.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from models.config import ESTIMATORS, OBJECTIVES


def sample_negatives(
    logits: torch.Tensor,
    y: torch.Tensor,
    group_size: int,
    hard_ratio: float,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) indices of wrong classes per row and a (B, G) mask of which are real. ``valid`` (B, K)
    bool limits the choice (e.g. to the gold bucket's responses); a row with fewer than G valid wrong
    classes gets fewer real negatives (the mask says which)."""
    B, K = logits.shape
    allowed = torch.ones(B, K, dtype=torch.bool, device=logits.device) if valid is None else valid.clone()
    allowed.scatter_(1, y[:, None], False)  # not the gold class (a scatter: ~5x cheaper than an index_put)
    with torch.no_grad():
        hard_scores = logits.detach().masked_fill(~allowed, float("-inf"))
        noise = torch.rand(B, K, generator=generator, device="cpu").to(logits.device)
        rand_scores = noise.masked_fill(~allowed, float("-inf"))
        use_hard = (torch.rand(B, generator=generator, device="cpu") < hard_ratio).to(logits.device)
        scores = torch.where(use_hard[:, None], hard_scores, rand_scores)
        g = min(group_size, K - 1)
        idx = scores.topk(g, dim=1).indices  # (B, g): highest logits, or a uniform random subset
        # Where a row has fewer valid classes than g, topk also returns -inf picks: mask them out.
        real = torch.gather(allowed, 1, idx)
        idx = torch.where(real, idx, y[:, None].expand_as(idx))
    return idx, real


def preference_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    negatives: torch.Tensor,
    beta: float,
    objective: str = "sigmoid",
    estimator: str = "mean",
    margin: float = 1.0,
    weights: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of the per-example preference loss; see the module docstring.

    ``neg_mask`` (B, G) marks which sampled negatives count (rows without any are left out).
    ``weights`` (B,) scales each example (adaptive weighting)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--pref_objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"--pref_group_estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    z_y = logits.gather(1, y[:, None])  # (B, 1)
    z_n = logits.gather(1, negatives)  # (B, G)
    mask = torch.ones_like(z_n, dtype=torch.bool) if neg_mask is None else neg_mask
    if estimator == "epo":
        # Expectation of the group's logits under the model's softmax over the group.
        w = torch.softmax(z_n.masked_fill(~mask, float("-inf")), dim=1)
        z_n = (w * z_n.masked_fill(~mask, 0.0)).sum(1, keepdim=True)
        mask = mask.any(1, keepdim=True)
    margin_term = beta * (z_y - z_n)
    per_pair = -F.logsigmoid(margin_term) if objective == "sigmoid" else F.relu(margin - margin_term)
    per_pair = per_pair * mask
    counts = mask.sum(1)
    per_example = per_pair.sum(1) / counts.clamp(min=1)
    if weights is not None:
        per_example = per_example * weights
    has = counts > 0
    return per_example[has].mean() if has.any() else logits.sum() * 0.0


def adaptive_weights(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - p_y per example, detached and scaled to mean 1 (all ones when every p_y is 1)."""
    with torch.no_grad():
        w = 1.0 - torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        mean = w.mean()
        return w / mean if mean > 0 else torch.ones_like(w)


def pref_weight_at(step: int, steps_per_epoch: int, pref_weight: float, warmup_epochs: float) -> float:
    """w(t): linear ramp from 0 to ``pref_weight`` over ``warmup_epochs`` epochs of optimizer steps."""
    if warmup_epochs <= 0:
        return pref_weight
    return pref_weight * min(1.0, step / (warmup_epochs * steps_per_epoch))
