"""Lexical evidence for the head: hashed character and word n-grams, TF-IDF weighted.

Sentence embeddings blur exact wording ("top up" vs "top-up limit", a card brand, an error code); a
sparse n-gram path straight to the logits keeps it. On held-out splits *of BANKING77 train* (the test
file untouched; tests/bench/train_split.py): +0.85 points of response accuracy with ten examples per
intent, neutral with 90 % of train (+0.1 ranking, -0.2 after fallbacks). A low-rank path through the
hidden layer gained nothing in an ad-hoc comparison.

Hashing (scikit-learn's murmurhash, deterministic across processes) needs no vocabulary, so the head
carries only the IDF vector (a buffer) and the n-gram weights.
"""

from __future__ import annotations

import numpy as np
import torch

LexBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # EmbeddingBag (indices, offsets, weights)


def n_features_for(num_outputs: int, budget: int = 4_000_000, most: int = 2**15, least: int = 2**12) -> int:
    """Hash buckets for a head with ``num_outputs`` logits: a power of two keeping the n-gram
    weights near ``budget`` parameters (16 MB), between ``least`` and ``most``."""
    n = most
    while n > least and n * num_outputs > budget:
        n //= 2
    return n


class Hasher:
    """texts -> L2-normalised TF-IDF rows over ``n_features`` hashed n-grams (scipy CSR)."""

    def __init__(self, n_features: int):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.n_features = n_features
        self.chars = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), n_features=n_features, alternate_sign=False, norm="l2")
        self.words = HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=n_features, alternate_sign=False, norm="l2")

    def counts(self, texts: list[str]):
        if not texts:  # scikit-learn's hasher cannot take an empty batch
            import scipy.sparse as sp

            return sp.csr_matrix((0, self.n_features), dtype=np.float64)
        return (self.chars.transform(texts) + self.words.transform(texts)).tocsr()

    def idf(self, counts) -> np.ndarray:
        """Smoothed IDF over the rows of ``counts`` (the training rows): log((1 + n) / (1 + df)) + 1."""
        df = np.bincount(counts.indices, minlength=self.n_features)
        return (np.log((1 + counts.shape[0]) / (1 + df)) + 1).astype(np.float32)

    def transform(self, texts: list[str], idf: np.ndarray):
        return self.weigh(self.counts(texts), idf)

    def weigh(self, counts, idf: np.ndarray):
        """``counts`` rows -> L2-normalised TF-IDF rows."""
        m = counts.multiply(idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
        norms[norms == 0] = 1.0
        return m.multiply(1.0 / norms[:, None]).tocsr().astype(np.float32)


def to_bag(rows, device: torch.device | str = "cpu") -> LexBatch:
    """CSR rows -> the (indices, offsets, per-sample weights) an EmbeddingBag takes."""
    return (
        torch.from_numpy(rows.indices.astype(np.int64)).to(device),
        torch.from_numpy(rows.indptr[:-1].astype(np.int64)).to(device),
        torch.from_numpy(rows.data.astype(np.float32)).to(device),
    )
