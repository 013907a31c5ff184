"""The head's n-gram features: hashed and weighed a chunk of rows at a time, equal to the whole
matrix done at once (scikit-learn's hashers, the smoothed IDF, row-wise L2 norms)."""

from __future__ import annotations

import numpy as np
import pytest

from models import lexical
from models.lexical import Hasher

TEXTS = ["How do I reset my password?", "", "card declined at the shop", "a", "reset password", "git reset --soft HEAD~1", "pls help"]


def reference(texts: list[str], train: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(IDF, TF-IDF rows) of ``texts`` as dense arrays, computed whole and in float64."""
    chars, words = Hasher(n_features).vectorizers()
    counts = (chars.transform(texts) + words.transform(texts)).toarray()
    df = (counts[train] > 0).sum(0)
    idf = np.log((1 + len(train)) / (1 + df)) + 1
    w = counts * idf
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return idf, w / np.where(norms == 0, 1.0, norms)


@pytest.mark.parametrize("chunk", [2, 3, 100])
@pytest.mark.parametrize("in_files", [False, True])
def test_features_made_in_chunks_equal_the_whole_matrix(tmp_path, monkeypatch, chunk, in_files):
    monkeypatch.setattr(lexical, "CHUNK_ROWS", chunk)
    folder = tmp_path if in_files else None
    hasher, train = Hasher(512), np.array([5, 0, 2, 3])
    counts = hasher.counts(TEXTS, folder)
    assert counts.shape == (7, 512) and counts.dtype == np.float32 and counts.indices.dtype == np.int32
    idf = hasher.idf(counts, train)
    ref_idf, ref_rows = reference(TEXTS, train, 512)
    np.testing.assert_allclose(idf, ref_idf, rtol=1e-6)
    rows = hasher.weigh(counts, idf, folder)
    assert rows.dtype == np.float32 and np.shares_memory(rows.indices, counts.indices)
    np.testing.assert_allclose(rows.toarray(), ref_rows, rtol=1e-5, atol=1e-7)
    assert rows[1].nnz == 0  # the empty message has no n-grams, and its norm is not divided by 0
    assert list(tmp_path.iterdir()) == []


def test_idf_over_all_rows_is_the_default():
    hasher = Hasher(256)
    counts = hasher.counts(TEXTS)
    np.testing.assert_array_equal(hasher.idf(counts), hasher.idf(counts, np.arange(len(TEXTS))))


def test_no_texts_give_an_empty_matrix():
    hasher = Hasher(64)
    counts = hasher.counts([])
    assert counts.shape == (0, 64) and counts.nnz == 0
    assert hasher.weigh(counts, np.ones(64, np.float32)).shape == (0, 64)
