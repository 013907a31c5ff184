"""Each preference loss against a value computed by hand, and the negative sampler's rules."""

import math

import pytest
import torch

from models.losses import adaptive_weights, pref_weight_at, preference_loss, sample_negatives

Z = torch.tensor([[2.0, 0.0, 1.0]])  # gold class 0; negatives 1 (gap 2) and 2 (gap 1)
Y = torch.tensor([0])
NEG = torch.tensor([[1, 2]])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sigmoid_mean_is_the_average_pairwise_dpo_loss():
    expected = (-math.log(sig(2.5 * 2)) - math.log(sig(2.5 * 1))) / 2
    assert float(preference_loss(Z, Y, NEG, beta=2.5, objective="sigmoid")) == pytest.approx(expected)


def test_repo_relu_is_a_hinge_on_the_scaled_gap():
    # max(0, 1 - 0.4*2) = 0.2 and max(0, 1 - 0.4*1) = 0.6
    assert float(preference_loss(Z, Y, NEG, beta=0.4, objective="repo_relu", margin=1.0)) == pytest.approx(0.4)
    assert float(preference_loss(Z, Y, NEG, beta=5.0, objective="repo_relu")) == 0.0  # separated: no pull


def test_epo_compares_with_the_groups_expected_logit():
    w1, w2 = math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))
    expected_logit = w1 * 0.0 + w2 * 1.0
    expected = -math.log(sig(2.0 * (2.0 - expected_logit)))
    assert float(preference_loss(Z, Y, NEG, beta=2.0, estimator="epo")) == pytest.approx(expected)


def test_masked_negatives_do_not_count_and_weights_scale_examples():
    z = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 2])
    neg = torch.tensor([[1, 2], [0, 1]])
    mask = torch.tensor([[True, False], [True, True]])
    first = -math.log(sig(2.0))  # only negative 1 of row 0
    second = (-math.log(sig(3.0)) - math.log(sig(2.0))) / 2
    got = preference_loss(z, y, neg, beta=1.0, weights=torch.tensor([2.0, 0.0]), neg_mask=mask)
    assert float(got) == pytest.approx((2 * first + 0 * second) / 2)


def test_hard_negatives_are_the_highest_wrong_logits_and_random_ones_are_valid():
    z = torch.tensor([[5.0, 4.0, 3.0, -1.0, 0.0]])
    idx, real = sample_negatives(z, torch.tensor([0]), group_size=2, hard_ratio=1.0)
    assert idx.tolist() == [[1, 2]] and real.all()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        idx, _ = sample_negatives(z, torch.tensor([0]), 2, 0.0, generator=g)
        assert 0 not in idx.tolist()[0] and len(set(idx.tolist()[0])) == 2
        seen.update(idx.tolist()[0])
    assert seen == {1, 2, 3, 4}  # random negatives reach every wrong class


def test_rows_with_too_few_valid_negatives_mask_the_rest():
    z = torch.zeros(1, 4)
    valid = torch.tensor([[True, True, False, False]])
    idx, real = sample_negatives(z, torch.tensor([0]), group_size=3, hard_ratio=1.0, valid=valid)
    assert real.tolist() == [[True, False, False]] and idx[0, 0].item() == 1


def test_adaptive_weights_follow_one_minus_p_gold_with_mean_one():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p_gold 0.5 and 0.75
    w = adaptive_weights(z, torch.tensor([0, 0]))
    assert w.tolist() == pytest.approx([0.5 / 0.375, 0.25 / 0.375])


def test_preference_weight_ramps_linearly_over_warmup_epochs():
    assert [pref_weight_at(s, 10, 0.2, 1.5) for s in (0, 5, 15, 30)] == pytest.approx([0.0, 0.2 / 3, 0.2, 0.2])
    assert pref_weight_at(0, 10, 0.2, 0.0) == 0.2


def test_unknown_objective_names_the_flag():
    with pytest.raises(ValueError, match="--pref_objective"):
        preference_loss(Z, Y, NEG, 1.0, objective="hinge")
