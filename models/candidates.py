"""What the head learns to pick between, and the rows it may not see while it learns: the
per-bucket response candidates and the validation split (stratified, with near twins kept on one
side)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


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
    def select(cls, responses: list[str], buckets: list[int], max_per_bucket: int) -> Candidates:
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

    @classmethod
    def from_meta(cls, meta: dict) -> Candidates:
        """A trained model's candidates from its meta's ``candidates`` block (texts, buckets, counts;
        None naming a bucket's "other" slot)."""
        texts, buckets = meta["texts"], [int(b) for b in meta["buckets"]]
        index = {t: i for i, t in enumerate(texts) if t is not None}
        other = {b: i for i, (t, b) in enumerate(zip(texts, buckets)) if t is None}
        return cls(texts, buckets, meta.get("counts", [0] * len(texts)), index, other)

    @property
    def learned(self) -> list[bool]:
        return [t is not None for t in self.texts]

    def targets(self, responses: list[str], buckets: list[int]) -> np.ndarray:
        """Candidate id per row: its response, else its bucket's other slot, else -1."""
        return np.array([self.index.get(r, self.other.get(b, -1)) for r, b in zip(responses, buckets)], dtype=np.int64)


def split_indices(
    keys: list[str],
    ids: list[str],
    val_split: float,
    mode: str,
    seed: int,
    families: list[str | None] | None = None,
    max_val: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val split that depends on the rows, not their order.

    Rows split by *family*: a synthetic variant belongs to its parent's family (``families[i]`` is the
    parent id, or None for an original). A held-out family contributes only its original row to
    validation, and its variants go nowhere: a variant of a training row in validation would make
    validation easy and the calibrated fallback threshold far too strict.

    ``stratified``: within each key (response), the families whose hashed id sorts first are held
    out, ``round(n * val_split)`` of them, and a key with one family stays in training (a response
    never seen in training cannot be learned). ``random``: each family by its hash alone. The same
    data therefore gets the same validation set on every run, which keeps champion comparisons fair.

    ``max_val``: at most this many families held out, those whose hash sorts first (the others
    train). Past ~10k rows a bigger validation set sharpens nothing that matters, and what is
    computed on it (the neighbour vote of every validation row against every training row, for the
    fallback's calibration) grows with validation x training rows.
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
        if max_val is not None and len(held) > max_val:
            held = set(sorted(held, key=h)[:max_val])
    in_val = np.array([f in held for f in fam], dtype=bool)
    original = np.array([f == i for f, i in zip(fam, ids)], dtype=bool)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val & original)
