"""retrieval/encoder.py: the int8 ONNX form against the torch form of the same weights, made once."""

import numpy as np
import pytest

from retrieval.encoder import INT8_ID, TORCH_ID, EmbeddingCache, embed, int8_model_path
from tests.conftest import INTENTS

SENTENCES = [u for _, asks in INTENTS.values() for u in asks] + ["a much longer message about a card that never arrived, " * 6]


def test_int8_vectors_are_unit_length_and_close_to_fp32():
    q = embed(SENTENCES, encoder_id=INT8_ID)
    f = embed(SENTENCES, encoder_id=TORCH_ID)
    assert q.shape == f.shape == (len(SENTENCES), 384) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    cos = (q * f).sum(1)
    assert cos.min() > 0.97 and cos.mean() > 0.99


def test_int8_keeps_the_neighbours_fp32_finds():
    # each asking's nearest other asking belongs to the same intent under both forms
    q = embed(SENTENCES[:-1], encoder_id=INT8_ID)
    f = embed(SENTENCES[:-1], encoder_id=TORCH_ID)
    for v in (q, f):
        sims = v @ v.T
        np.fill_diagonal(sims, -1)
        nearest = sims.argmax(1)
        assert (nearest // 6 == np.arange(len(v)) // 6).mean() >= 0.9


def test_a_text_gets_the_same_vector_alone_or_among_others():
    # int8 activations share one scale per run: batching texts together would make a vector depend on
    # its batch-mates; each text runs alone, so the content-hash cache maps a text to one vector.
    alone = np.stack([embed([s], encoder_id=INT8_ID)[0] for s in SENTENCES])
    together = embed(SENTENCES[::-1], encoder_id=INT8_ID)[::-1]
    np.testing.assert_array_equal(alone, together)


def test_the_onnx_file_is_made_once():
    path = int8_model_path()
    stamp = path.stat().st_mtime_ns
    assert int8_model_path() == path and path.stat().st_mtime_ns == stamp and path.stat().st_size > 10_000_000


def test_cache_keys_by_encoder(tmp_path):
    cache = EmbeddingCache(tmp_path, INT8_ID)
    v1, new1 = cache.embed(["hello there", "hello there"])
    v2, new2 = EmbeddingCache(tmp_path, INT8_ID).embed(["hello there"])
    assert (new1, new2) == (1, 0) and np.array_equal(v1[0], v2[0])
    _, new3 = EmbeddingCache(tmp_path, TORCH_ID).embed(["hello there"])
    assert new3 == 1  # another encoder never reuses the int8 vector


def test_a_fine_tuned_id_needs_its_folder():
    with pytest.raises(ValueError, match="fine-tuned encoder but no folder"):
        embed(["x"], encoder_id=TORCH_ID + "+ft:0123")
