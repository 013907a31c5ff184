"""The neighbour vote: the stored messages nearest a new one vote for their responses, and the vote
is mixed into the head's p(response) (DESIGN.md §4, "bucket probabilities plus retrieval"):

    p(r | x) = (1 - w) * p_head(r | x) + w * sum over the k nearest rows i of softmax_i(cos(x, x_i) / T) * [r_i = r]

a k-nearest-neighbour interpolation in the manner of kNN-LM (Khandelwal et al., ICLR 2020). The head
generalises; the neighbours remember wordings it has seen, including the rare ones it underfits.

The rows vote through the head's candidate slots (``Candidates.targets``): a row whose response the
head learned votes for that response, one whose response was left to retrieval votes for its bucket's
"other" slot (whose probability chat then shares among the retrieved rows, as before). Rows with
neither do not vote; a message without any voting neighbour keeps the head's probabilities.

Its weight, k and temperature were chosen on held-out rows of BANKING77 *train*, never its test file
(BENCHMARKS.md, "Trials behind the defaults: the neighbour vote").
"""

from __future__ import annotations

import numpy as np

K = 10
TEMPERATURE = 0.05  # the same softmax temperature chat uses on retrieved rows' cosines


CHUNK_BYTES = 256 << 20  # a chunk's similarities and partition indices: 12 bytes a (query, row) pair


def nearest(
    queries: np.ndarray, memory: np.ndarray, k: int = K, chunk: int | None = None, among: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by cosine of unit ``queries`` (B, D) among unit ``memory`` rows (M, D):
    (cosines (B, k'), row indices (B, k')), best first, k' = min(k, rows searched).

    ``among``: a (M,) mask of the rows that may be returned (training rows, without copying them out
    of a memory-mapped table); ``chunk``: queries at a time, by default as many as fit
    ``CHUNK_BYTES`` (at 1M rows, 21: a fixed 1,024 held 12 GB)."""
    allowed = len(memory) if among is None else int(np.count_nonzero(among))
    k = min(k, allowed)
    b = len(queries)
    if k == 0 or b == 0:
        return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
    chunk = chunk or max(1, min(1024, CHUNK_BYTES // (12 * max(len(memory), 1))))
    cos, idx = np.empty((b, k), np.float32), np.empty((b, k), np.int64)
    for i in range(0, b, chunk):
        sims = queries[i : i + chunk] @ memory.T  # (chunk, M)
        if among is not None:
            sims[:, ~among] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if memory.shape[0] > k else np.tile(np.arange(k), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        idx[i : i + chunk] = np.take_along_axis(top, order, 1)
        cos[i : i + chunk] = np.take_along_axis(top_sims, order, 1)
    return cos, idx


def vote(cosines: np.ndarray, slots: np.ndarray, num_candidates: int, temperature: float = TEMPERATURE) -> np.ndarray:
    """(B, C) the neighbours' vote: ``cosines`` (B, k) of each message's nearest rows and their
    candidate ``slots`` (B, k), -1 for a row that cannot vote. Each row of the result sums to 1, or is
    all zero when no neighbour of that message votes."""
    b = len(cosines)
    out = np.zeros((b, num_candidates), np.float64)
    if cosines.size == 0:
        return out
    ok = slots >= 0
    z = np.where(ok, cosines.astype(np.float64) / temperature, -np.inf)
    top = z.max(1, keepdims=True)
    w = np.where(ok, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    np.add.at(out, (np.repeat(np.arange(b), slots.shape[1]), np.where(ok, slots, 0).ravel()), w.ravel())
    return out


def mix(log_pr: np.ndarray, votes: np.ndarray, weight: float) -> np.ndarray:
    """log((1 - weight) * p_head + weight * vote) (B, C); rows without a vote keep ``log_pr``."""
    if weight <= 0:
        return log_pr
    has = votes.sum(1) > 0
    mixed = (1.0 - weight) * np.exp(log_pr.astype(np.float64)) + weight * votes
    with np.errstate(divide="ignore"):  # a response neither the head nor a neighbour backs: log 0
        out = np.log(mixed)
    return np.where(has[:, None], out, log_pr).astype(log_pr.dtype)


def neighbour_log_probs(
    log_pr: np.ndarray,
    queries: np.ndarray,
    memory: np.ndarray,
    memory_slots: np.ndarray,
    weight: float,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> np.ndarray:
    """``log_pr`` (B, C) of messages embedded as ``queries`` with the vote of their ``k`` nearest
    ``memory`` rows mixed in (what chat answers from)."""
    if weight <= 0 or len(memory) == 0:
        return log_pr
    cos, idx = nearest(queries, memory, k)
    return mix(log_pr, vote(cos, memory_slots[idx], log_pr.shape[1], temperature), weight)
