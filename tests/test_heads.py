import pytest
import torch

from models.heads import BucketHead, HeadConfig


def _head(buckets=(0, 0, 1, 2)):
    torch.manual_seed(0)
    return BucketHead(HeadConfig(num_candidates=len(buckets), input_dim=8, num_buckets=3, hidden_dim=16), torch.tensor(buckets))


def test_shapes_and_response_distribution_sums_to_one():
    head = _head().eval()
    x = torch.randn(5, 8)
    bucket_logits, cand_logits = head(x)
    assert bucket_logits.shape == (5, 3) and cand_logits.shape == (5, 4)
    log_pb, log_pr = head.response_log_probs(x)
    assert torch.allclose(log_pr.exp().sum(1), torch.ones(5), atol=1e-5)
    # A bucket with one candidate gives it p(response) == p(bucket).
    assert torch.allclose(log_pr[:, 2], log_pb[:, 1], atol=1e-6)


def test_within_bucket_normalisation_matches_hand_computation():
    head = _head()
    logits = torch.tensor([[1.0, 3.0, 0.5, -2.0]])
    within = head.within_bucket_log_probs(logits)
    expected0 = 1.0 - torch.logsumexp(torch.tensor([1.0, 3.0]), 0)
    assert torch.allclose(within[0, 0], expected0)
    assert torch.allclose(within[0, 2:], torch.zeros(2))


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--model_size 'huge'"):
        HeadConfig(num_candidates=1, model_size="huge")
    with pytest.raises(ValueError, match="--num_buckets"):
        HeadConfig(num_candidates=1, num_buckets=1)
