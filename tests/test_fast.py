"""models/fast.py and the training path of models/lexical.py: the same maths as the torch pieces they
replace, checked against those pieces on small random data."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from models.fast import Dropout, LazyAdam
from models.lexical import bag_logits, to_bag, to_rows_bag


def _csr(rows: int, features: int, seed: int) -> sp.csr_matrix:
    return sp.random(rows, features, density=0.15, format="csr", dtype=np.float32, random_state=seed)


def test_rows_bag_gives_the_embedding_bags_logits_and_gradient():
    torch.manual_seed(0)
    m = _csr(6, 50, seed=1)
    reference = nn.EmbeddingBag(50, 4, mode="sum", sparse=True)
    weight = nn.Parameter(reference.weight.detach().clone())
    dz = torch.randn(6, 4)

    z_ref = reference(*to_bag(m)[:2], per_sample_weights=to_bag(m)[2])
    (z_ref * dz).sum().backward()
    z = bag_logits(weight, to_rows_bag(m))
    (z * dz).sum().backward()

    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(weight.grad.to_dense(), reference.weight.grad.to_dense())
    # one gradient row per distinct hash bucket of the batch, ascending
    rows = weight.grad.coalesce().indices()[0]
    assert rows.tolist() == sorted(set(m.indices.tolist()))


def test_lazy_adam_matches_sparse_adam_step_for_step():
    torch.manual_seed(0)
    a = nn.EmbeddingBag(40, 3, mode="sum", sparse=True)
    b = nn.EmbeddingBag(40, 3, mode="sum", sparse=True)
    b.weight.data.copy_(a.weight.data)
    opt_a = torch.optim.SparseAdam(a.parameters(), lr=0.05)
    opt_b = LazyAdam(b.parameters(), lr=0.05)
    for step in range(6):
        m = _csr(5, 40, seed=10 + step)
        target = torch.randn(5, 3)
        for module, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            bag = to_bag(m)
            ((module(*bag[:2], per_sample_weights=bag[2]) - target) ** 2).sum().backward()  # repeated indices
            opt.step()
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    # same state layout: a SparseAdam state loads into LazyAdam (resume states stay readable)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.state_dict()["state"][0]["step"] == 6


def test_lazy_adam_takes_the_rows_bag_gradient():
    torch.manual_seed(0)
    w_ref = nn.Parameter(torch.randn(30, 2))
    w = nn.Parameter(w_ref.detach().clone())
    opt_ref, opt = torch.optim.SparseAdam([w_ref], lr=0.1), LazyAdam([w], lr=0.1)
    for step in range(4):
        m = _csr(4, 30, seed=step)
        bag = to_bag(m)
        torch.nn.functional.embedding_bag(bag[0], w_ref, bag[1], mode="sum", per_sample_weights=bag[2], sparse=True).sum().backward()
        bag_logits(w, to_rows_bag(m)).sum().backward()
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.5, 0.25, 0.1])
def test_dropout_keeps_1_minus_p_and_the_expectation(p):
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.ones(400, 500)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(drop.keep / 256, abs=0.005)
    assert drop.keep / 256 == pytest.approx(1 - p, abs=1 / 512)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout: E[y] = x
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(256.0 / drop.keep)


def test_dropout_is_identity_in_eval_and_at_zero_and_follows_the_seed():
    x = torch.randn(8, 16)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    torch.manual_seed(3)
    first = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.5).train()(x), first)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_the_n_grams_are_scikit_learns():
    from sklearn.feature_extraction.text import HashingVectorizer

    from models.lexical import CHAR_NGRAMS, WORD_NGRAMS, char_wb_ngrams, word_ngrams

    chars = HashingVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS).build_analyzer()
    words = HashingVectorizer(analyzer="word", ngram_range=WORD_NGRAMS).build_analyzer()
    texts = [
        "How do I reset my password?",
        "a",
        "ab",
        "abcd",
        "   ",
        "",
        "tab\tand\n\nnew  lines",
        "İstanbul ǅemal ÉCOLE",
        "x y-z 12,50€ 😀",
    ]
    for text in texts:
        assert char_wb_ngrams(text) == chars(text), text
        assert word_ngrams(text) == words(text), text


def test_the_one_message_hasher_equals_scikit_learns():
    from models.lexical import Hasher

    hasher = Hasher(4096)
    texts = [
        "How do I reset my password?",
        "I can't log in!! pls help",
        "café crème – 12,50 €",
        "a",
        "   ",
        "git reset --soft HEAD~1",
        "İ 😀 ǅ",
    ]
    idf = hasher.idf(hasher.counts(texts + ["another row", "password reset"]))
    reference = hasher.transform(texts, idf)
    for i, text in enumerate(texts):
        idx, val = hasher.one(text, idf)
        row = reference[i]
        assert idx.tolist() == sorted(row.indices.tolist())
        np.testing.assert_allclose(val, row.toarray()[0, idx], rtol=1e-5, atol=1e-7)
        assert len(idx) == row.nnz


def test_a_head_scores_one_message_the_same_through_either_path():
    from models.config import HeadConfig
    from models.heads import BucketHead

    torch.manual_seed(0)
    head = BucketHead(HeadConfig(num_candidates=4, input_dim=8, hidden_dim=16, lexical_features=1024), torch.tensor([0, 0, 1, 1])).eval()
    torch.nn.init.normal_(head.lexical.weight)
    x = torch.randn(2, 8)
    texts = ["where is my parcel?", "reset password"]
    with torch.no_grad():
        both = head.response_log_probs(x, head.lex(texts))[1]
        alone = head.response_log_probs(x[:1], head.lex(texts[:1]))[1]
    torch.testing.assert_close(alone[0], both[0])
