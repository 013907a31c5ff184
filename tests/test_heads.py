import pytest
import torch

from models.config import HeadConfig
from models.heads import BucketHead, warm_start


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


def test_within_bucket_normalisation_equals_the_masked_log_sum_exp_and_its_gradient():
    torch.manual_seed(0)
    buckets = torch.tensor([0, 2, 2, 0, 3, 2, 3])  # bucket 1 has no candidate
    head = BucketHead(HeadConfig(num_candidates=7, num_buckets=4, hidden_dim=8, lexical_features=0), buckets)
    x = (torch.randn(6, 7) * 40).requires_grad_()  # spread enough that a shared max would underflow
    membership = torch.nn.functional.one_hot(buckets, 4).T.bool()  # (K, C)
    masked = x[:, None, :].masked_fill(~membership[None], float("-inf"))
    expected = x - torch.logsumexp(masked, dim=-1)[:, buckets]
    got = head.within_bucket_log_probs(x)
    assert torch.allclose(got, expected, atol=1e-5)
    w = torch.randn(6, 7)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_exp,) = torch.autograd.grad((expected * w).sum(), x)
    assert torch.isfinite(g_got).all() and torch.allclose(g_got, g_exp, atol=1e-5)


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--model_size 'huge'"):
        HeadConfig(num_candidates=1, model_size="huge")
    with pytest.raises(ValueError, match="--num_buckets"):
        HeadConfig(num_candidates=1, num_buckets=1)


def _sized(size, seed=0, **widths):
    if widths.pop("small", False):  # width 8 for every branch the size has
        names = ("expansion_dim", "extra_expansion_dim", "third_expansion_dim")[: {"base": 0, "large": 1, "xlarge": 2, "xxlarge": 3}[size]]
        widths = dict.fromkeys(names, 8)
    torch.manual_seed(seed)
    return BucketHead(
        HeadConfig(num_candidates=4, input_dim=8, num_buckets=3, hidden_dim=16, model_size=size, **widths), torch.tensor([0, 0, 1, 2])
    )


def test_each_size_adds_a_branch_and_the_widths_default_per_size():
    assert [len(_sized(s).branches) for s in ("base", "large", "xlarge", "xxlarge")] == [0, 1, 2, 3]
    assert _sized("base").router is None and _sized("large").router is None and _sized("xlarge").router is not None
    assert HeadConfig(num_candidates=1, model_size="xxlarge").branch_dims == [1024, 2048, 3072]
    assert HeadConfig(num_candidates=1, model_size="xlarge", expansion_dim=896, extra_expansion_dim=1536).branch_dims == [896, 1536]
    with pytest.raises(ValueError, match="--extra_expansion_dim needs --model_size xlarge or xxlarge"):
        HeadConfig(num_candidates=1, model_size="large", extra_expansion_dim=64)


@pytest.mark.parametrize("small, large", [("base", "large"), ("large", "xlarge"), ("xlarge", "xxlarge"), ("base", "xxlarge")])
def test_a_larger_head_warm_started_from_a_smaller_one_gives_identical_logits(small, large):
    src = _sized(small, seed=1, small=True)
    # Train the source a little so its weights (and branch outputs) are not at their init values.
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    x, yb, yc = torch.randn(32, 8), torch.randint(0, 3, (32,)), torch.randint(0, 4, (32,))
    for _ in range(5):
        bl, cl = src(x)
        loss = torch.nn.functional.cross_entropy(bl, yb) + torch.nn.functional.cross_entropy(cl, yc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst = _sized(large, seed=2, small=True)
    report = warm_start(dst, src.state_dict())
    src.eval(), dst.eval()
    for a, b in zip(src(x), dst(x)):
        assert torch.equal(a, b)
    assert "trunk.0.weight" in report["matched"] and "candidate.weight" in report["matched"]
    assert report["skipped"] == [] and all(n.startswith(("branches.", "router.")) for n in report["new"])
    assert report["new"] and all(
        n.split(".")[1] not in [str(i) for i in range(len(src.branches))] for n in report["new"] if n.startswith("branches.")
    )


def test_warm_start_reports_skipped_tensors_and_remaps_candidates_by_text():
    src = _sized("base")
    torch.manual_seed(3)
    dst = BucketHead(HeadConfig(num_candidates=3, input_dim=8, num_buckets=3, hidden_dim=16), torch.tensor([0, 1, 2]))
    report = warm_start(dst, src.state_dict(), old_texts=["a", "b", "c", "d"], new_texts=["d", "x", "b"])
    assert dst.candidate.weight[0].tolist() == src.candidate.weight[3].tolist()
    assert dst.candidate.weight[2].tolist() == src.candidate.weight[1].tolist()
    assert report["remapped"] == ["candidate.weight (2/3 responses)", "candidate.bias (2/3 responses)", "lexical.weight (2/3 responses)"]
    wide = BucketHead(HeadConfig(num_candidates=4, input_dim=8, num_buckets=3, hidden_dim=32), torch.tensor([0, 0, 1, 2]))
    report = warm_start(wide, src.state_dict())
    assert "trunk.0.weight (shape (16, 8) vs (32, 8))" in report["skipped"] and "norm.weight" in report["matched"]


def test_a_narrower_branch_warm_starts_a_wider_one_exactly():
    src = _sized("large", seed=1, expansion_dim=6)
    with torch.no_grad():
        src.branches[0].up.weight.normal_()  # a trained branch: non-zero output
    dst = _sized("xlarge", seed=2, expansion_dim=10, extra_expansion_dim=4)
    report = warm_start(dst, src.state_dict())
    x = torch.randn(7, 8)
    src.eval(), dst.eval()
    assert torch.allclose(src(x)[0], dst(x)[0], atol=1e-6) and torch.allclose(src(x)[1], dst(x)[1], atol=1e-6)
    assert "branches.0.down.weight (widened (6, 16) -> (10, 16))" in report["matched"] and report["skipped"] == []


def test_head_settings_validate_once_and_keep_each_sizes_widths():
    from models.config import HeadSettings

    wide = HeadSettings(model_size="xxlarge", expansion_dim=8, extra_expansion_dim=16, third_expansion_dim=32)
    assert wide.for_size("base").given() == {"model_size": "base", "num_buckets": 10}
    assert wide.for_size("xlarge").given() == {"model_size": "xlarge", "expansion_dim": 8, "extra_expansion_dim": 16, "num_buckets": 10}
    with pytest.raises(ValueError, match="--third_expansion_dim needs --model_size xxlarge"):
        HeadSettings(model_size="large", third_expansion_dim=32)
    with pytest.raises(ValueError, match="--dropout must be in"):
        HeadSettings(dropout=1.5)
