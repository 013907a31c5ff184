"""The classifier head: 10 bucket logits plus a learned scorer over each bucket's response candidates.

score(response r in bucket b) = log p(b | x) + log p(r | b, x)   (DESIGN.md §3)

The bucket logits route; the candidate logits, normalised *within* each bucket, pick the response.

Sizes grow the same trunk with residual adapter branches (DESIGN.md §3):

    base      LayerNorm -> Linear(input, hidden) -> GELU -> Dropout            -> h
    large     h + branch1(h)                                      (--expansion_dim)
    xlarge    h + sum_i 2 * sigmoid(router(h))_i * branch_i(h)       (+ --extra_expansion_dim)
    xxlarge   three branches under the router                     (+ --third_expansion_dim)

Every branch's output layer and the router start at zero, so a branch adds nothing until it learns
something and a router at zero weighs every branch 1: a larger head warm-started from a smaller one
computes exactly the smaller one's logits before training (``warm_start``). The gates are
independent sigmoids rather than a softmax on purpose: a softmax over three branches cannot
reproduce a trained two-branch mixture, so xlarge -> xxlarge would not be exact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.config import HeadConfig
from models.fast import Dropout


class Branch(nn.Module):
    """A residual adapter: LayerNorm -> down -> GELU -> up, with ``up`` starting at zero."""

    def __init__(self, dim: int, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.drop = Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(F.gelu(self.down(self.norm(h)))))


class BucketHead(nn.Module):
    def __init__(self, cfg: HeadConfig, candidate_bucket: torch.Tensor, candidate_learned: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        # Unit-length sentence embeddings have entries ~1/sqrt(384); LayerNorm puts them on a scale
        # where the default init and one learning rate work for every encoder.
        self.norm = nn.LayerNorm(cfg.input_dim)
        self.trunk = nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden_dim), nn.GELU(), Dropout(cfg.dropout))
        self.branches = nn.ModuleList(Branch(cfg.hidden_dim, w, cfg.dropout) for w in cfg.branch_dims)
        self.router = None
        if len(self.branches) > 1:
            self.router = nn.Linear(cfg.hidden_dim, len(self.branches))
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
        self.bucket = nn.Linear(cfg.hidden_dim, cfg.num_buckets)
        self.candidate = nn.Linear(cfg.hidden_dim, cfg.num_candidates)
        self.lexical = None
        if cfg.lexical_features:
            # n-gram -> [bucket logits, candidate logits]; sparse gradients (only the n-grams in a
            # batch move), zero start so adding it changes nothing until it learns.
            self.lexical = nn.EmbeddingBag(cfg.lexical_features, cfg.num_buckets + cfg.num_candidates, mode="sum", sparse=True)
            nn.init.zeros_(self.lexical.weight)
            # IDF of the training rows: data, not a learned weight (set by the trainer, saved with it).
            self.register_buffer("lexical_idf", torch.ones(cfg.lexical_features))
        # (C,) bucket of each candidate, to normalise candidates per bucket.
        self.register_buffer("candidate_bucket", candidate_bucket.long())
        # (C,) False for a bucket's "other" slot (responses left to retrieval), True for a response.
        learned = torch.ones_like(candidate_bucket, dtype=torch.bool) if candidate_learned is None else candidate_learned.bool()
        self.register_buffer("candidate_learned", learned)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(self.norm(x))
        if self.router is None:
            for branch in self.branches:
                h = h + branch(h)
            return h
        # A zero router row weighs its branch exactly 1 (2 * sigmoid(0)): warm starts stay exact.
        gates = 2 * torch.sigmoid(self.router(h))  # (B, n)
        return h + sum(gates[:, i : i + 1] * branch(h) for i, branch in enumerate(self.branches))

    def forward(self, x: torch.Tensor, lex=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) [+ lexical bag of the same rows, or a training ``RowsBag``] -> bucket logits (B, K), candidate logits (B, C)."""
        h = self.features(x)
        bucket_logits, cand_logits = self.bucket(h), self.candidate(h)
        if self.lexical is not None and lex is not None:
            from models.lexical import RowsBag, bag_logits

            z = bag_logits(self.lexical.weight, lex) if isinstance(lex, RowsBag) else self.lexical(*lex[:2], per_sample_weights=lex[2])
            bucket_logits = bucket_logits + z[:, : self.cfg.num_buckets]
            cand_logits = cand_logits + z[:, self.cfg.num_buckets :]
        return bucket_logits, cand_logits

    def hasher(self):
        """The n-gram hasher for this head's lexical path (None without one)."""
        if self.lexical is None:
            return None
        if getattr(self, "_hasher", None) is None:
            from models.lexical import Hasher

            self._hasher = Hasher(self.cfg.lexical_features)
        return self._hasher

    def lex(self, texts: list[str]):
        """The lexical bag of ``texts`` for ``forward`` (None when the head has no lexical path)."""
        if self.lexical is None:
            return None
        from models.lexical import to_bag

        idf, dev = self.lexical_idf.cpu().numpy(), self.lexical_idf.device  # a view, not a copy, on CPU
        if len(texts) == 1:  # a chat turn: the fast path for one message
            idx, val = self.hasher().one(texts[0], idf)
            return torch.from_numpy(idx).to(dev), torch.zeros(1, dtype=torch.long, device=dev), torch.from_numpy(val).to(dev)
        return to_bag(self.hasher().transform(texts, idf), dev)

    def within_bucket_log_probs(self, cand_logits: torch.Tensor) -> torch.Tensor:
        """log p(r | bucket(r), x) for every candidate r: (B, C).

        A log-sum-exp per bucket over its own candidates, done by scattering into (B, K) rather than
        masking a (B, K, C) copy: K times less work."""
        b, k = cand_logits.shape[0], self.cfg.num_buckets
        idx = self.candidate_bucket[None].expand(b, -1)
        # Each bucket's own max keeps exp() in range; detached, as it cancels out of the result.
        top = cand_logits.new_full((b, k), float("-inf")).scatter_reduce(1, idx, cand_logits.detach(), "amax")
        top = top.masked_fill(torch.isinf(top), 0.0)  # buckets without candidates: never read
        shifted = (cand_logits - top.gather(1, idx)).exp()
        # A bucket's sum is >= 1 (its max contributes exp(0)); the floor only keeps empty buckets finite.
        lse = top + cand_logits.new_zeros((b, k)).scatter_add(1, idx, shifted).clamp_min(1e-30).log()
        return cand_logits - lse.gather(1, idx)

    def response_scores(self, log_pb: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        """log p(r) = log p(bucket(r)) + log p(r | bucket(r)) (B, C), from log p(bucket) (B, K) and
        ``within_bucket_log_probs`` (B, C)."""
        return log_pb.index_select(1, self.candidate_bucket) + within

    def response_log_probs(self, x: torch.Tensor, lex=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(bucket) (B, K), log p(response) (B, C)); the latter sums to 1 over candidates."""
        bucket_logits, cand_logits = self(x, lex)
        log_pb = F.log_softmax(bucket_logits, dim=-1)
        return log_pb, self.response_scores(log_pb, self.within_bucket_log_probs(cand_logits))


CANDIDATE_TENSORS = ("candidate.weight", "candidate.bias")
DATA_BUFFERS = ("candidate_bucket", "candidate_learned", "lexical_idf")  # describe the data; never copied


def warm_start(
    head: BucketHead, state: dict[str, torch.Tensor], old_texts: list[str | None] | None = None, new_texts: list[str | None] | None = None
) -> dict[str, list[str]]:
    """Copy every tensor of ``state`` that fits ``head`` (same name and shape) and report the rest.

    The candidate layer is matched by *response text* when both candidate lists are known, so a head
    trained on other data still carries over what it learned about the responses both share.
    Returns ``{"matched": [...], "remapped": [...], "new": [...], "skipped": [...]}`` (tensor names).
    """
    own = head.state_dict()
    report: dict[str, list[str]] = {"matched": [], "remapped": [], "new": [], "skipped": []}
    update = {}
    for name, tensor in state.items():
        if name not in own:
            report["skipped"].append(f"{name} (not in a {head.cfg.model_size} head)")
        elif name in DATA_BUFFERS:
            continue  # describe this head's own data; never copied
        elif (
            name == "lexical.weight"
            and old_texts is not None
            and new_texts is not None
            and old_texts != new_texts
            and tensor.shape[0] == own[name].shape[0]
        ):
            # Columns: K bucket logits, then one per candidate: remap the candidate columns by text.
            k = head.cfg.num_buckets
            old_col = {t: k + i for i, t in enumerate(old_texts) if t is not None}
            cols = [(k + j, old_col[t]) for j, t in enumerate(new_texts) if t in old_col]
            fresh = own[name].clone()
            fresh[:, :k] = tensor[:, :k]
            if cols:
                dst, src = zip(*cols)
                fresh[:, list(dst)] = tensor[:, list(src)]
            update[name] = fresh
            report["remapped"].append(f"{name} ({len(cols)}/{len(new_texts)} responses)")
        elif name in CANDIDATE_TENSORS and old_texts is not None and new_texts is not None and old_texts != new_texts:
            # Rows of responses both heads know; the rest keep their fresh init.
            old_row = {t: i for i, t in enumerate(old_texts) if t is not None}
            rows = [(j, old_row[t]) for j, t in enumerate(new_texts) if t in old_row]
            if rows and tensor.shape[1:] == own[name].shape[1:]:
                fresh = own[name].clone()
                dst, src = zip(*rows)
                fresh[list(dst)] = tensor[list(src)].to(fresh.dtype)
                update[name] = fresh
                report["remapped"].append(f"{name} ({len(rows)}/{len(new_texts)} responses)")
            else:
                report["skipped"].append(f"{name} (no shared responses)")
        elif name.startswith("router.") and tensor.shape[1:] == own[name].shape[1:] and tensor.shape[0] < own[name].shape[0]:
            # A router with fewer branches: its rows gate the same branches here; new rows stay 0.
            fresh = own[name].clone()
            fresh[: tensor.shape[0]] = tensor
            update[name] = fresh
            report["matched"].append(f"{name} (first {tensor.shape[0]} of {own[name].shape[0]} branches)")
        elif name.startswith("branches.") and _widens(name, tensor.shape, own[name].shape):
            # A narrower branch inside a wider one: copy it into the first units; the extra units'
            # output weights are zero, so the branch still computes exactly what it did.
            fresh = own[name].clone()
            if ".up.weight" in name:
                fresh.zero_()
                fresh[:, : tensor.shape[1]] = tensor
            else:
                fresh[: tensor.shape[0]] = tensor
            update[name] = fresh
            report["matched"].append(f"{name} (widened {tuple(tensor.shape)} -> {tuple(own[name].shape)})")
        elif tensor.shape != own[name].shape:
            report["skipped"].append(f"{name} (shape {tuple(tensor.shape)} vs {tuple(own[name].shape)})")
        else:
            update[name] = tensor
            report["matched"].append(name)
    report["new"] = [n for n in own if n not in state and n not in DATA_BUFFERS]
    head.load_state_dict({**own, **update}, strict=True)
    return report


def _widens(name: str, old: torch.Size, new: torch.Size) -> bool:
    """Whether ``old`` fits in ``new`` along the branch width (down: rows; up.weight: columns)."""
    if len(old) != len(new) or old == new:
        return False
    if ".up.weight" in name:
        return old[0] == new[0] and old[1] < new[1]
    if ".down." in name:
        return old[0] < new[0] and old[1:] == new[1:]
    return False
