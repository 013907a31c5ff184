"""Lexical evidence for the head: hashed character and word n-grams, TF-IDF weighted.

Sentence embeddings blur exact wording ("top up" vs "top-up limit", a card brand, an error code); a
sparse n-gram path straight to the logits keeps it. It costs about half a training step and
earns its place on held-out data (BENCHMARKS.md, "Trials behind the defaults: the n-gram path");
the alternatives tried there all did worse.

Hashing (murmurhash3, deterministic across processes) needs no vocabulary, so the head carries only
the IDF vector (a buffer) and the n-gram weights. Training hashes batches with scikit-learn's
HashingVectorizer; a chat turn hashes its one message with the same analyzers and hash written out
here (``mmh3``), because importing scikit-learn costs a chat process ~0.7 s before its first answer.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models.memory import Appender, scratch_array

LexBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # EmbeddingBag (indices, offsets, weights)

CHAR_NGRAMS, WORD_NGRAMS = (2, 5), (1, 2)
CHUNK_ROWS = 16_384  # texts hashed, and rows weighed, at a time
_WHITE_SPACES = re.compile(r"\s\s+")  # scikit-learn's, for char_wb
_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


def char_wb_ngrams(text: str) -> list[str]:
    """HashingVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS)'s analyzer: lower-cased
    character n-grams inside space-padded words (a word shorter than n gives one n-gram)."""
    lo, hi = CHAR_NGRAMS
    grams: list[str] = []
    for w in _WHITE_SPACES.sub(" ", text.lower()).split():
        w = f" {w} "
        for n in range(lo, hi + 1):
            grams.extend(w[i : i + n] for i in range(max(1, len(w) - n + 1)))
            if len(w) <= n:
                break
    return grams


def word_ngrams(text: str) -> list[str]:
    """HashingVectorizer(analyzer="word", ngram_range=WORD_NGRAMS)'s analyzer: lower-cased words of
    two or more word characters, then each pair of neighbours."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class Hasher:
    """texts -> L2-normalised TF-IDF rows over ``n_features`` hashed n-grams (scipy CSR)."""

    def __init__(self, n_features: int):
        self.n_features = n_features
        self._vectorizers = None

    def vectorizers(self):
        """scikit-learn's two hashers, made on first use (training and batches; a chat turn needs none)."""
        if self._vectorizers is None:
            from sklearn.feature_extraction.text import HashingVectorizer

            n = self.n_features
            self._vectorizers = tuple(
                HashingVectorizer(analyzer=a, ngram_range=r, n_features=n, alternate_sign=False, norm="l2")
                for a, r in (("char_wb", CHAR_NGRAMS), ("word", WORD_NGRAMS))
            )
        return self._vectorizers

    def counts(self, texts: list[str], folder: Path | None = None):
        """texts -> CSR (N, n_features) float32: each analyzer's counts L2-normalised, then summed.

        Hashed ``CHUNK_ROWS`` texts at a time: scikit-learn's temporaries for every row at once were
        most of a 1M-row finetune's memory (BENCHMARKS.md, "A large table"). With ``folder``, the index and value arrays are scratch files there, mapped back
        (models/memory.py), so every row's n-grams (8 bytes a non-zero, ~180 a message) are not the process's own."""
        import scipy.sparse as sp

        indices, data = Appender(folder, np.int32), Appender(folder, np.float32)
        indptr = np.zeros(len(texts) + 1, np.int64)
        if texts:
            chars, words = self.vectorizers()
        for at in range(0, len(texts), CHUNK_ROWS):
            batch = texts[at : at + CHUNK_ROWS]
            part = (chars.transform(batch) + words.transform(batch)).tocsr()
            indices.append(part.indices)
            data.append(part.data)
            indptr[at + 1 : at + len(batch) + 1] = indptr[at] + part.indptr[1:]
        idx = indices.array()
        if indptr[-1] > np.iinfo(np.int32).max:  # past ~10M rows: scipy then wants 64-bit indices, and would copy them in memory
            wide = scratch_array(folder, idx.shape, np.int64)
            for at in range(0, len(idx), 1 << 26):
                wide[at : at + (1 << 26)] = idx[at : at + (1 << 26)]
            idx = wide
        return sp.csr_matrix((data.array(), idx, indptr), shape=(len(texts), self.n_features), copy=False)

    def idf(self, counts, rows: np.ndarray | None = None) -> np.ndarray:
        """Smoothed IDF over ``rows`` of ``counts`` (the training rows; all by default):
        log((1 + n) / (1 + df)) + 1, gathered ``CHUNK_ROWS`` rows at a time."""
        if rows is None:
            df, n = np.bincount(counts.indices, minlength=self.n_features), counts.shape[0]
        else:
            df, n = np.zeros(self.n_features, np.int64), len(rows)
            for at in range(0, n, CHUNK_ROWS):
                df += np.bincount(counts[rows[at : at + CHUNK_ROWS]].indices, minlength=self.n_features)
        return (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)

    def transform(self, texts: list[str], idf: np.ndarray):
        return self.weigh(self.counts(texts), idf)

    def one(self, text: str, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``transform([text], idf)``'s one row as (indices, values), without scikit-learn's per-call
        validation and scipy's constructors: the head's part of a chat turn fell from 3.9 to 1.7 ms
        (tests/bench/latency.py). The same n-grams and hashing as HashingVectorizer (murmurhash3 of
        the UTF-8 n-gram, seed 0, abs mod n), tested equal."""
        from mmh3 import hash as murmurhash3_32

        n = self.n_features
        merged: dict[int, float] = {}
        for analyze in (char_wb_ngrams, word_ngrams):  # each vectorizer's counts are L2-normalised, then summed
            counts: dict[int, int] = {}
            for gram in analyze(text):
                h = murmurhash3_32(gram, 0)
                i = (2147483647 - (n - 1)) % n if h == -2147483648 else abs(h) % n
                counts[i] = counts.get(i, 0) + 1
            norm = float(np.sqrt(sum(c * c for c in counts.values()))) or 1.0
            for i, c in counts.items():
                merged[i] = merged.get(i, 0.0) + c / norm
        if not merged:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = np.fromiter(sorted(merged), dtype=np.int64, count=len(merged))
        val = np.array([merged[i] for i in idx.tolist()], dtype=np.float64) * idf[idx]
        val /= np.linalg.norm(val) or 1.0
        return idx, val.astype(np.float32)

    def weigh(self, counts, idf: np.ndarray, folder: Path | None = None):
        """``counts`` rows -> L2-normalised TF-IDF rows (float32), ``CHUNK_ROWS`` rows at a time.

        The result shares ``counts``' indices (every weight is positive, so the pattern is the same);
        with ``folder``, its values are a scratch file there, as in ``counts``."""
        import scipy.sparse as sp

        n, indptr = counts.shape[0], counts.indptr
        values = scratch_array(folder, (counts.nnz,), np.float32)
        for at in range(0, n, CHUNK_ROWS):
            end = min(n, at + CHUNK_ROWS)
            lo, hi = int(indptr[at]), int(indptr[end])
            v = counts.data[lo:hi].astype(np.float64) * idf[counts.indices[lo:hi]]
            row = np.repeat(np.arange(end - at), np.diff(indptr[at : end + 1]))
            norms = np.sqrt(np.bincount(row, weights=v * v, minlength=end - at))
            norms[norms == 0] = 1.0
            values[lo:hi] = v / norms[row]
        return sp.csr_matrix((values, counts.indices, indptr), shape=counts.shape, copy=False)


class RowsBag(NamedTuple):
    """A training batch's n-grams over only the hash buckets it uses (``rows``, U of them).

    The backward pass then touches U rows of the n-gram weights instead of one row per n-gram
    occurrence: with ~160 n-grams per message, autograd's sparse gradient for an EmbeddingBag was a
    (B * 160, outputs) matrix that SparseAdam then had to coalesce (~14 ms of a 31 ms step, batch 256).
    """

    rows: torch.Tensor  # (U,) distinct hash buckets of the batch, ascending
    bag: LexBatch  # the batch's EmbeddingBag input, indices remapped to positions in ``rows``
    transposed: torch.Tensor  # (U, B) sparse CSR of the same TF-IDF values, for the weight gradient


def to_rows_bag(rows, device: torch.device | str = "cpu") -> RowsBag:
    """CSR rows (B, n_features) -> a ``RowsBag`` for ``bag_logits``."""
    import scipy.sparse as sp

    used = np.zeros(rows.shape[1], dtype=bool)
    used[rows.indices] = True
    distinct = np.flatnonzero(used)
    position = np.cumsum(used) - 1  # hash bucket -> its position in ``distinct``
    local = sp.csr_matrix((rows.data, position[rows.indices], rows.indptr), shape=(rows.shape[0], len(distinct)))
    t = local.T.tocsr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        transposed = torch.sparse_csr_tensor(
            torch.from_numpy(t.indptr.astype(np.int64)),
            torch.from_numpy(t.indices.astype(np.int64)),
            torch.from_numpy(t.data.astype(np.float32)),
            size=t.shape,
            check_invariants=False,
        )
    return RowsBag(torch.from_numpy(distinct.astype(np.int64)).to(device), to_bag(local, device), transposed.to(device))


class _RowsBagLogits(torch.autograd.Function):
    """z = TF-IDF rows @ weight, over the batch's distinct rows; the weight's gradient is a coalesced
    sparse (U rows) tensor: d weight[rows] = X_local^T @ dz, one sparse matmul."""

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        rows: torch.Tensor,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        values: torch.Tensor,
        transposed: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(rows, transposed)
        ctx.weight_shape = weight.shape
        local = weight.index_select(0, rows)  # (U, O)
        return torch.nn.functional.embedding_bag(indices, local, offsets, mode="sum", per_sample_weights=values)  # (B, O)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        rows, transposed = ctx.saved_tensors
        grad_local = transposed @ dz.contiguous()  # (U, O)
        grad = torch.sparse_coo_tensor(rows[None], grad_local, ctx.weight_shape, is_coalesced=True, check_invariants=False)
        return grad, None, None, None, None, None


def bag_logits(weight: torch.Tensor, batch: RowsBag) -> torch.Tensor:
    """The lexical logits (B, O) of a ``RowsBag`` with ``weight`` (n_features, O)."""
    return _RowsBagLogits.apply(weight, batch.rows, *batch.bag, batch.transposed)


def to_bag(rows, device: torch.device | str = "cpu") -> LexBatch:
    """CSR rows -> the (indices, offsets, per-sample weights) an EmbeddingBag takes."""
    return (
        torch.from_numpy(rows.indices.astype(np.int64)).to(device),
        torch.from_numpy(rows.indptr[:-1].astype(np.int64)).to(device),
        torch.from_numpy(rows.data.astype(np.float32)).to(device),
    )
