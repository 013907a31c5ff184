"""Assigning rows to response buckets.

A row's *group* is its ``label`` (intent) when it has one, else the label of rows with the same
response (partially labelled logs), else its response text. Groups, never rows,
are clustered into ``num_buckets`` buckets, so all of an intent (or all askings of one response) land
in one bucket. A group's position is the mean of its user vectors plus the mean of its response
vectors: similar questions with similar answers share a bucket.
"""

from __future__ import annotations

import numpy as np

from conversations.dataset import normalise


def group_key(label: str | None, response: str) -> str:
    return f"label:{label}" if label is not None else f"response:{normalise(response)}"


def group_keys(labels: list[str | None], responses: list[str]) -> list[str]:
    """Group per row; an unlabelled row takes the label its response has elsewhere, if just one."""
    label_of: dict[str, set[str]] = {}
    for lab, resp in zip(labels, responses):
        if lab is not None:
            label_of.setdefault(normalise(resp), set()).add(lab)
    inherited = {r: next(iter(labs)) for r, labs in label_of.items() if len(labs) == 1}
    return [group_key(lab if lab is not None else inherited.get(normalise(resp)), resp) for lab, resp in zip(labels, responses)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def spherical_kmeans(
    points: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    iters: int = 50,
    rng: np.random.Generator | int = 0,
    plus_plus: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors (N, D) into ``k`` groups by cosine -> ((k, D) unit centroids, (N,) ids).

    Seeds by (weighted) k-means++ or, with ``plus_plus=False``, ``k`` distinct random rows (cheap for
    many cells, where the search index uses it); stops when no row changes group. An emptied group
    keeps its centroid. The same ``rng`` seed gives the same groups in every process."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    n = len(points)
    w = np.ones(n, points.dtype) if weights is None else np.asarray(weights, points.dtype)
    if plus_plus:
        centers = [points[rng.choice(n, p=w / w.sum())]]
        for _ in range(1, k):
            dist = 1.0 - np.max(points @ np.stack(centers).T, axis=1)  # (N,)
            prob = np.clip(dist, 0, None) * w
            idx = rng.choice(n, p=prob / prob.sum()) if prob.sum() > 0 else rng.choice(n)
            centers.append(points[idx])
        c = np.stack(centers).astype(points.dtype)
    else:
        c = points[np.sort(rng.choice(n, k, replace=False))].copy()
    assign = np.full(n, -1)
    for _ in range(iters):
        new = np.argmax(points @ c.T, axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(c)
        np.add.at(sums, assign, points * w[:, None])
        keep = np.bincount(assign, minlength=k) > 0
        c[keep] = _unit(sums[keep])
    return c, assign


def assign_buckets(
    keys: list[str], user_vecs: np.ndarray, response_vecs: np.ndarray, num_buckets: int = 10, seed: int = 0
) -> tuple[np.ndarray, dict[str, int]]:
    """Bucket per row (N,) int32 and the map group key -> bucket, for rows grouped by ``group_keys``.

    With at most ``num_buckets`` groups each group gets its own bucket (in sorted key order, so the
    map is stable); the remaining buckets stay empty.
    """
    groups = sorted(set(keys))
    index = {g: i for i, g in enumerate(groups)}
    row_group = np.array([index[k] for k in keys])
    pos = np.zeros((len(groups), user_vecs.shape[1]), dtype=np.float64)
    resp = np.zeros_like(pos)
    np.add.at(pos, row_group, user_vecs)
    np.add.at(resp, row_group, response_vecs)
    group_bucket = group_buckets(pos, resp, np.bincount(row_group, minlength=len(groups)), num_buckets, seed)
    return group_bucket[row_group].astype(np.int32), {g: int(b) for g, b in zip(groups, group_bucket)}


def group_buckets(user_sums: np.ndarray, response_sums: np.ndarray, counts: np.ndarray, num_buckets: int = 10, seed: int = 0) -> np.ndarray:
    """Bucket per group (G,), from each group's sum of user vectors and of response vectors (G, D)
    and its row count: what ``assign_buckets`` does once the rows are summed, so a caller can sum
    them without holding a response vector per row (retrieval/store.py)."""
    if num_buckets < 2:
        raise ValueError(f"--num_buckets must be at least 2, got {num_buckets}")
    if len(counts) <= num_buckets:
        return np.arange(len(counts))
    points = _unit(_unit(user_sums) + _unit(response_sums))
    _, group_bucket = spherical_kmeans(points, num_buckets, np.asarray(counts, dtype=np.float64), rng=seed)
    return group_bucket
