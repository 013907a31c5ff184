"""The classifier head: 10 bucket logits plus a learned scorer over each bucket's response candidates.

score(response r in bucket b) = log p(b | x) + log p(r | b, x)   (DESIGN.md §3)

The bucket logits route; the candidate logits, normalised *within* each bucket, pick the response.
Larger sizes (adapter branches) arrive with their own config fields; ``base`` is a one-hidden-layer MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

SIZES = ("base",)


@dataclass
class HeadConfig:
    num_candidates: int
    input_dim: int = 384
    num_buckets: int = 10
    hidden_dim: int = 1024
    dropout: float = 0.5
    model_size: str = "base"

    def __post_init__(self):
        if self.model_size not in SIZES:
            raise ValueError(f"--model_size {self.model_size!r} is not available; choose one of {', '.join(SIZES)}")
        if self.num_buckets < 2:
            raise ValueError(f"--num_buckets must be at least 2, got {self.num_buckets}")
        if self.num_candidates < 1:
            raise ValueError("the head needs at least one response candidate; the training data has none")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class BucketHead(nn.Module):
    def __init__(self, cfg: HeadConfig, candidate_bucket: torch.Tensor, candidate_learned: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        # Unit-length sentence embeddings have entries ~1/sqrt(384); LayerNorm puts them on a scale
        # where the default init and one learning rate work for every encoder.
        self.norm = nn.LayerNorm(cfg.input_dim)
        self.trunk = nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden_dim), nn.GELU(), nn.Dropout(cfg.dropout))
        self.bucket = nn.Linear(cfg.hidden_dim, cfg.num_buckets)
        self.candidate = nn.Linear(cfg.hidden_dim, cfg.num_candidates)
        # (C,) bucket of each candidate; and (K, C) membership, to normalise candidates per bucket.
        self.register_buffer("candidate_bucket", candidate_bucket.long())
        # (C,) False for a bucket's "other" slot (responses left to retrieval), True for a response.
        learned = torch.ones_like(candidate_bucket, dtype=torch.bool) if candidate_learned is None else candidate_learned.bool()
        self.register_buffer("candidate_learned", learned)
        self.register_buffer("membership", F.one_hot(candidate_bucket.long(), cfg.num_buckets).T.bool(), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> bucket logits (B, K), candidate logits (B, C)."""
        h = self.trunk(self.norm(x))
        return self.bucket(h), self.candidate(h)

    def within_bucket_log_probs(self, cand_logits: torch.Tensor) -> torch.Tensor:
        """log p(r | bucket(r), x) for every candidate r: (B, C)."""
        masked = cand_logits[:, None, :].masked_fill(~self.membership[None], float("-inf"))  # (B, K, C)
        lse = torch.logsumexp(masked, dim=-1)  # (B, K); -inf for buckets with no candidate
        return cand_logits - lse[:, self.candidate_bucket]

    def response_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(bucket) (B, K), log p(response) (B, C)); the latter sums to 1 over candidates."""
        bucket_logits, cand_logits = self(x)
        log_pb = F.log_softmax(bucket_logits, dim=-1)
        return log_pb, log_pb[:, self.candidate_bucket] + self.within_bucket_log_probs(cand_logits)
