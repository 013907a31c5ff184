"""Two drop-in replacements for torch pieces that dominated a head training step on CPU.

torch's CPU dropout draws one random number per element, and SparseAdam coalesces and masks the
sparse n-gram gradients every step; both dominated a head step on CPU. Both are replaced by the same
maths done with fewer, larger kernels; the profile and the effect on whole fits are in BENCHMARKS.md
("Why the hand-written pieces stay").
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from whole random 64-bit words, 8 mask bytes per draw.

    Each element is kept when its random byte is below ``round((1 - p) * 256)``: keep probability
    ``k / 256`` (exactly 1 - p for p = 0.5 and every multiple of 1/256), and kept values are scaled by
    ``256 / k`` so the expectation is exactly the input, as with ``nn.Dropout``. The bytes come from
    torch's global generator, so seeding and resume states cover them as before.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.keep = max(1, min(256, round((1.0 - p) * 256)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.keep == 256:
            return x
        n = x.numel()
        # random_(-2**63, None) fills the whole int64 range: all 8 bytes of each word are uniform.
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        mask = words.view(torch.uint8)[:n].view(x.shape) < self.keep
        # One float mask with the scale in it: a single multiply forward and backward (x * bool_mask *
        # scale converted the mask twice and multiplied twice each way).
        return x * mask.to(x.dtype).mul_(256.0 / self.keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LazyAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam``'s exact update (lazy Adam: only the rows a batch touched move, with
    the global step count in the bias correction), computed on the unique rows with one sort, dense
    gathers and torch's fused Adam kernel instead of ``coalesce`` and two ``sparse_mask`` calls. Same
    state layout, so resume states and ``load_state_dict`` work unchanged; tests/test_fast.py checks
    it against SparseAdam.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr = group["eps"], group["lr"]
            if group.get("maximize"):
                raise ValueError("LazyAdam does not implement maximize=True; use torch.optim.SparseAdam")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients (an nn.Embedding/EmbeddingBag with sparse=True)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                index, values = grad._indices()[0], grad._values()  # (nnz,), (nnz, D); repeats allowed
                if values.numel() == 0:
                    continue
                # models/lexical.py hands over one row per distinct index, ascending (autograd drops
                # the coalesced flag on the way to .grad, so check the indices themselves).
                if grad.is_coalesced() or bool((index[1:] > index[:-1]).all()):
                    rows, g = index, values
                else:
                    rows, inverse = torch.unique(index, return_inverse=True)
                    g = values.new_zeros((len(rows), values.shape[1])).index_add_(0, inverse, values)  # (U, D)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # Gather the touched rows, run torch's fused Adam kernel on them (one pass instead of
                # eight elementwise ops), scatter them back. Rows are distinct, so index_copy_ is a plain write.
                step = state["step"]
                m, v, w = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows), p.index_select(0, rows)
                # The fused kernel divides by (sqrt(v) / sqrt(1 - beta2^t) + eps); SparseAdam by
                # (sqrt(v) + eps) with sqrt(1 - beta2^t) in the step size. Scaling eps makes them equal.
                torch._fused_adam_(
                    [w],
                    [g.to(w.dtype)],
                    [m],
                    [v],
                    [],
                    [torch.tensor(float(step), device=p.device)],
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=0.0,
                    eps=eps / (1 - beta2**step) ** 0.5,
                    amsgrad=False,
                    maximize=False,
                )
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                p.index_copy_(0, rows, w)
        return loss
