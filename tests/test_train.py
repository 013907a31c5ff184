import numpy as np
import pytest
import torch

from models.heads import BucketHead, HeadConfig
from models.train import Candidates, TrainConfig, calibrate_min_confidence, lr_lambda, split_indices, train


def test_candidates_keep_the_most_frequent_per_bucket_plus_an_other_slot():
    c = Candidates.select(["a", "b", "b", "c", "c", "c", "d"], [0, 0, 0, 1, 1, 1, 1], max_per_bucket=1)
    assert (c.texts, c.buckets, c.counts) == (["b", "c", None, None], [0, 1, 0, 1], [2, 3, 1, 1])
    assert c.learned == [True, True, False, False]
    assert c.targets(["a", "b", "c", "d"], [0, 0, 1, 1]).tolist() == [2, 0, 1, 3]
    everything = Candidates.select(["a", "b"], [0, 1], max_per_bucket=5)
    assert (everything.texts, everything.other) == (["a", "b"], {})


def test_stratified_split_is_deterministic_and_keeps_every_response_in_training():
    keys = ["r1"] * 10 + ["r2"] * 10 + ["solo"]
    ids = [f"id{i}" for i in range(21)]
    tr, va = split_indices(keys, ids, 0.2, "stratified", seed=0)
    assert len(va) == 4 and sorted(np.concatenate([tr, va]).tolist()) == list(range(21))
    assert 20 in tr  # a response seen once stays in training
    tr2, va2 = split_indices(list(reversed(keys)), list(reversed(ids)), 0.2, "stratified", seed=0)
    assert sorted(ids[20 - i] for i in va2) == sorted(ids[i] for i in va)  # order does not matter


def test_variants_stay_with_their_parent_and_only_originals_validate():
    keys = ["r"] * 12
    ids = [f"o{i}" for i in range(4)] + [f"v{i}" for i in range(8)]
    families = [None] * 4 + [f"o{i % 4}" for i in range(8)]  # two variants per original
    tr, va = split_indices(keys, ids, 0.5, "stratified", seed=0, families=families)
    held = {ids[i] for i in va}
    assert len(held) == 2 and held <= {"o0", "o1", "o2", "o3"}
    for i in tr:  # no training row belongs to a held-out family
        assert (families[i] or ids[i]) not in held
    assert len(tr) == 6  # the two kept originals and their four variants; held-out variants go nowhere


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup=2, total=12)
    assert [round(cos(s), 3) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda("linear", 0, 10)(5) == 0.5
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_training_separates_toy_clusters_and_picks_best_epoch():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)).astype(np.float32)
    y = np.repeat(np.arange(4), 30)
    x = centers[y] + 0.3 * rng.normal(size=(120, 16)).astype(np.float32)
    buckets = y // 2  # candidates 0,1 in bucket 0; 2,3 in bucket 1
    head = BucketHead(HeadConfig(num_candidates=4, input_dim=16, num_buckets=10, hidden_dim=32, dropout=0.0), torch.tensor([0, 0, 1, 1]))
    tr, va = split_indices([str(i) for i in y], [str(i) for i in range(120)], 0.25, "stratified", 0)
    seen = []
    res = train(head, x, buckets, y, tr, va, TrainConfig(epochs=15, batch_size=16, lr=5e-3), on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == list(range(1, len(seen) + 1))
    best = res.history[res.best_epoch - 1]
    assert best["val_response_acc"] == max(r["val_response_acc"] for r in res.history) == 1.0
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_calibration_bounds_the_in_scope_loss():
    log_pr = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]]))
    y = torch.tensor([0, 0, 1, 1])  # last one is wrong
    thr = calibrate_min_confidence(log_pr, y, torch.tensor([True, True]), keep=1.0)
    assert thr == pytest.approx(0.6)


@pytest.mark.parametrize("kwargs, flag", [({"epochs": 0}, "--epochs"), ({"val_split": 1.0}, "--val_split"), ({"lr_schedule": "step"}, "--lr_schedule"), ({"split_mode": "x"}, "--split_mode")])
def test_train_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**kwargs)
