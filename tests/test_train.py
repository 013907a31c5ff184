import time

import numpy as np
import pytest
import torch

from models.calibration import calibrate_thresholds
from models.candidates import Candidates, split_indices
from models.config import HeadConfig, TrainConfig
from models.heads import BucketHead
from models.train import EMA, lr_lambda, train


def test_candidates_keep_the_most_frequent_per_bucket_plus_an_other_slot():
    c = Candidates.select(["a", "b", "b", "c", "c", "c", "d"], [0, 0, 0, 1, 1, 1, 1], max_per_bucket=1)
    assert (c.texts, c.buckets, c.counts) == (["b", "c", None, None], [0, 1, 0, 1], [2, 3, 1, 1])
    assert c.learned == [True, True, False, False]
    assert c.targets(["a", "b", "c", "d"], [0, 0, 1, 1]).tolist() == [2, 0, 1, 3]


def test_candidates_from_a_meta_give_rows_the_slots_training_gave_them():
    """What chat and the neighbour vote rebuild from a model's meta: the same slot per row."""
    trained = Candidates.select(["a", "b", "b", "c", "c", "c", "d"], [0, 0, 0, 1, 1, 1, 1], max_per_bucket=1)
    back = Candidates.from_meta({"texts": trained.texts, "buckets": trained.buckets, "counts": trained.counts})
    rows = (["a", "b", "c", "d", "e"], [0, 0, 1, 1, 1])
    assert back.targets(*rows).tolist() == trained.targets(*rows).tolist() == [2, 0, 1, 3, 3]
    assert (back.index, back.other) == (trained.index, trained.other)
    # learned responses, else the bucket's "other" slot, else no slot (-1)
    got = Candidates.from_meta({"texts": ["a", "b", None], "buckets": [0, 1, 1]}).targets(["a", "b", "c", "d"], [0, 1, 1, 0])
    assert got.tolist() == [0, 1, 2, -1]
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


def test_auto_batch_and_rate_follow_the_data_size():
    from models.config import SMALL_DATA_ROWS

    small, big = TrainConfig().resolve(SMALL_DATA_ROWS - 1, 0), TrainConfig().resolve(SMALL_DATA_ROWS, 0)
    assert (small.batch_size, small.lr) == (64, 1e-3) and (big.batch_size, big.lr) == (512, 3e-3)
    assert TrainConfig(batch_size=256).resolve(100, 0).lr == 2e-3  # a given batch gets the rate of its size
    assert TrainConfig(batch_size=256, lr=0.01).resolve(100, 0).lr == 0.01  # a given rate is kept


def test_epoch_selection_and_refit_follow_the_validation_size():
    from models.config import SELECT_MIN_VAL_ROWS

    few, many = TrainConfig().resolve(700, SELECT_MIN_VAL_ROWS - 1), TrainConfig().resolve(9000, SELECT_MIN_VAL_ROWS)
    # Too few validation rows to tell epochs apart: the whole schedule runs and its last epoch is kept.
    assert (few.select_metric, few.early_stop_patience) == ("last", 0)
    assert (many.select_metric, many.early_stop_patience) == ("response_acc", 6)
    # Refit on small data only (where the validation rows are a real share of it), never with train_all.
    assert few.refit and not many.refit and not TrainConfig(train_all=True).resolve(700, 70).refit
    # What the user gave is kept.
    given = TrainConfig(select_metric="loss", early_stop_patience=2, refit=False).resolve(700, 10)
    assert (given.select_metric, given.early_stop_patience, given.refit) == ("loss", 2, False)


def test_training_separates_toy_clusters_and_picks_best_epoch():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)).astype(np.float32)
    y = np.repeat(np.arange(4), 30)
    x = centers[y] + 0.3 * rng.normal(size=(120, 16)).astype(np.float32)
    buckets = y // 2  # candidates 0,1 in bucket 0; 2,3 in bucket 1
    head = BucketHead(HeadConfig(num_candidates=4, input_dim=16, num_buckets=10, hidden_dim=32, dropout=0.0), torch.tensor([0, 0, 1, 1]))
    tr, va = split_indices([str(i) for i in y], [str(i) for i in range(120)], 0.25, "stratified", 0)
    seen = []
    res = train(
        head,
        x,
        buckets,
        y,
        tr,
        va,
        TrainConfig(epochs=15, batch_size=16, lr=5e-3, select_metric="response_acc", early_stop_patience=6),
        on_epoch=seen.append,
    )
    assert [r["epoch"] for r in seen] == list(range(1, len(seen) + 1))
    best = res.history[res.best_epoch - 1]
    assert best["val_response_acc"] == max(r["val_response_acc"] for r in res.history) == 1.0
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_calibration_is_the_conformal_order_statistic_of_correct_answers():
    conf = torch.linspace(0.5, 0.99, 399)  # 399 correct answers, confidences 0.5 .. 0.99
    log_pr = torch.log(torch.stack([conf, 1 - conf], 1))
    y = torch.zeros(399, dtype=torch.long)
    # Half the 1 % budget each: k = floor(400 * 0.01 / 2) = 2, the second smallest confidence and
    # the second smallest margin (conf - (1 - conf)) among correct answers.
    got = calibrate_thresholds(log_pr, y, torch.tensor([True, True]), keep=0.99)
    assert got["min_confidence"] == pytest.approx(float(conf[1]))
    assert got["min_margin"] == pytest.approx(float(2 * conf[1] - 1))
    # Wrong answers do not count; with too few correct answers no threshold can keep the promise, so
    # only answers far below the least sure right one (confidence 0.6, halved) fall back, and the
    # margin gate stays off.
    few = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]]))
    assert calibrate_thresholds(few, torch.tensor([0, 0, 1, 1]), torch.tensor([True, True]), keep=0.99) == pytest.approx(
        {"min_confidence": 0.3, "min_margin": 0.0}
    )
    assert calibrate_thresholds(few, torch.tensor([0, 0, 1, 1]), torch.tensor([True, True]), keep=0.5) == pytest.approx(
        {"min_confidence": 0.6, "min_margin": 0.2}
    )


def test_similarity_calibration_is_the_conformal_order_statistic_of_right_answers_similarities():
    from models.calibration import calibrate_similarity

    sims = torch.linspace(0.3, 0.9, 399)
    right = torch.ones(399, dtype=torch.bool)
    # A 0.5 % budget: k = floor(400 * 0.005) = 2, the second smallest similarity of a right answer.
    assert calibrate_similarity(sims, right, keep=0.995) == pytest.approx(float(sims[1]))
    # The default 0.25 %: k = 1, the smallest.
    assert calibrate_similarity(sims, right) == pytest.approx(float(sims[0]))
    right[:10] = False  # wrong answers do not count: 389 right ones, k = floor(390 * 0.005) = 1
    assert calibrate_similarity(sims, right, keep=0.995) == pytest.approx(float(sims[10]))
    # Too few right answers to keep the promise: half the least similarity among them; none: no gate.
    few = torch.tensor([0.8, 0.5, 0.1, 0.6])
    assert calibrate_similarity(few, torch.tensor([True, True, False, True])) == pytest.approx(0.25)
    assert calibrate_similarity(few, torch.zeros(4, dtype=torch.bool)) == 0.0


def test_the_fallback_budget_is_split_between_the_similarity_gate_and_the_softmax_gates():
    from models.calibration import calibrate, calibrate_similarity

    conf = torch.linspace(0.5, 0.99, 399)
    log_pr = torch.log(torch.stack([conf, 1 - conf], 1))
    y, learned = torch.zeros(399, dtype=torch.long), torch.tensor([True, True])
    sims = torch.linspace(0.3, 0.9, 399)
    got = calibrate(log_pr, y, learned, sims, budget=0.02)
    # 1 % to the similarity gate, 1 % to confidence and margin (half each: k = 2)
    assert got == pytest.approx(
        {
            **calibrate_thresholds(log_pr, y, learned, keep=0.99),
            "min_similarity": calibrate_similarity(sims, torch.ones(399, dtype=torch.bool), keep=0.99),
        }
    )
    assert got["min_confidence"] == pytest.approx(float(conf[1])) and got["min_similarity"] == pytest.approx(float(sims[3]))
    assert calibrate(log_pr, y, learned, sims, budget=0.0) == {"min_confidence": 0.0, "min_margin": 0.0, "min_similarity": 0.0}
    assert calibrate(log_pr, y, learned, None, budget=0.02)["min_similarity"] == 0.0  # nothing to compare with


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"epochs": 0}, "--epochs"),
        ({"val_split": 1.0}, "--val_split"),
        ({"lr_schedule": "step"}, "--lr_schedule"),
        ({"split_mode": "x"}, "--split_mode"),
        ({"precision": "fp16"}, "--precision"),
        ({"fallback_budget": 0.5}, "--fallback_budget"),
        ({"fallback_budget": -0.01}, "--fallback_budget"),
    ],
)
def test_train_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**kwargs)


def _toy(n_per=30, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, dim)).astype(np.float32)
    y = np.repeat(np.arange(4), n_per)
    x = centers[y] + 0.3 * rng.normal(size=(len(y), dim)).astype(np.float32)
    return x, y // 2, y


def _toy_head(seed=0, size="base"):
    torch.manual_seed(seed)
    cfg = HeadConfig(
        num_candidates=4,
        input_dim=16,
        num_buckets=10,
        hidden_dim=32,
        dropout=0.0,
        model_size=size,
        expansion_dim=8 if size != "base" else None,
    )
    return BucketHead(cfg, torch.tensor([0, 0, 1, 1]))


def test_ema_arithmetic_with_its_warm_up():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # the first update copies (AveragedModel's rule)
    assert ema.shadow["weight"].item() == pytest.approx(1.0)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # n = 1: d = min(0.9, 2/11): shadow = d*1 + (1-d)*3
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11 * 1.0 + 9 / 11 * 3.0)
    for _ in range(100):
        ema.update(lin)
    assert ema.rate() == 0.9
    shadow = ema.shadow["weight"].item()
    live = ema.swap_in(lin)
    assert lin.weight.item() == pytest.approx(shadow) and live["weight"].item() == 3.0
    restored = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.9)
    restored.load_state_dict(ema.state_dict())  # a resumed run continues the same average
    assert restored.rate() == 0.9 and restored.shadow["weight"].item() == pytest.approx(shadow)


def test_gradient_accumulation_equals_the_big_batch():
    x, yb, yc = _toy()
    tr, va = np.arange(120), np.array([], dtype=np.int64)
    a, b = _toy_head(), _toy_head()
    # Without the preference term: its negatives are sampled per micro-batch, so draws differ.
    # fp32: the claim is about exact arithmetic; bf16 rounds each micro-batch's matmuls differently.
    common = dict(epochs=2, lr=1e-2, early_stop_patience=0, seed=3, pref_weight=0.0, precision="fp32")
    ra = train(a, x, yb, yc, tr, va, TrainConfig(batch_size=40, grad_accum_steps=1, **common))
    rb = train(b, x, yb, yc, tr, va, TrainConfig(batch_size=10, grad_accum_steps=4, **common))
    for k in ra.state:
        assert torch.allclose(ra.state[k], rb.state[k], atol=1e-5), k


def test_precision_auto_follows_the_hardware_and_bf16_keeps_float32_weights(monkeypatch):
    import models.config as train_module

    # The hardware cannot change here: pretend each answer of the capability check in turn.
    monkeypatch.setattr(train_module, "bf16_is_fast", lambda device: False)
    assert TrainConfig().resolve(100, 0).precision == "fp32"
    monkeypatch.setattr(train_module, "bf16_is_fast", lambda device: True)
    assert TrainConfig().resolve(100, 0).precision == "bf16"
    assert TrainConfig(precision="fp32").resolve(100, 0).precision == "fp32"  # what the user gave is kept
    x, yb, yc = _toy()
    runs = {}
    for precision in ("bf16", "fp32"):
        head, seen = _toy_head(), set()
        head.candidate.register_forward_hook(lambda module, args, out, seen=seen: seen.add(out.dtype))
        runs[precision] = train(
            head, x, yb, yc, np.arange(120), None, TrainConfig(epochs=4, batch_size=16, lr=5e-3, early_stop_patience=0, precision=precision)
        )
        # The training passes run in the asked precision; evaluation and the weights stay float32.
        assert (torch.bfloat16 in seen) == (precision == "bf16")
        assert all(v.dtype == torch.float32 for v in runs[precision].state.values() if v.is_floating_point())
    bf16, fp32 = ([r["train_loss"] for r in runs[p].history] for p in ("bf16", "fp32"))
    assert bf16[-1] < bf16[0] and bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_balanced_sampler_draws_buckets_equally_often(monkeypatch):
    x, yb, yc = _toy()
    keep = np.concatenate([np.arange(0, 60), np.arange(60, 66)])  # bucket 0: 60 rows, bucket 1: 6 rows
    drawn = []
    real = torch.multinomial

    def spy(weights, n, **kw):
        idx = real(weights, n, **kw)
        drawn.append(idx)
        return idx

    monkeypatch.setattr(torch, "multinomial", spy)
    train(
        _toy_head(),
        x,
        yb,
        yc,
        keep,
        np.array([], dtype=np.int64),
        TrainConfig(epochs=20, batch_size=66, balanced_sampler=True, early_stop_patience=0),
    )
    buckets = yb[keep][torch.cat(drawn).numpy()]
    assert abs((buckets == 1).mean() - 0.5) < 0.05  # 9 % of the rows, half of the draws


def test_warmup_steps_ramp_the_learning_rate():
    x, yb, yc = _toy()
    steps = []
    train(
        _toy_head(),
        x,
        yb,
        yc,
        np.arange(120),
        np.array([], dtype=np.int64),
        TrainConfig(epochs=1, batch_size=10, lr=0.1, warmup_steps=4, lr_schedule="constant"),
        on_step=steps.append,
    )
    assert [round(s["lr"], 4) for s in steps[:5]] == [0.05, 0.075, 0.1, 0.1, 0.1]  # (step+1)/4 after each step
    assert [s["step"] for s in steps] == list(range(1, 13))


def test_until_epoch_stops_early_on_the_full_schedule():
    # A refit stops at the epoch validation chose, on the schedule of the whole run: its learning
    # rate at the stop is the cosine's value there, not zero.
    x, yb, yc = _toy()
    cfg = TrainConfig(epochs=10, batch_size=40, lr=0.01, lr_schedule="cosine")  # 3 steps per epoch
    res = train(_toy_head(), x, yb, yc, np.arange(120), None, cfg, until_epoch=4)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4] and res.best_epoch == 4
    assert res.history[-1]["lr"] == pytest.approx(0.01 * lr_lambda("cosine", 0, 30)(12))
    whole = train(_toy_head(), x, yb, yc, np.arange(120), None, cfg)
    assert [round(a["train_loss"], 6) for a in whole.history[:4]] == [round(b["train_loss"], 6) for b in res.history]


@pytest.mark.parametrize(
    "options", [{}, {"ema_decay": 0.9, "pref_weight": 0.3, "pref_group_size": 2, "balanced_sampler": True, "grad_accum_steps": 2}]
)
def test_a_killed_run_resumes_to_the_same_result(tmp_path, options):
    x, yb, yc = _toy()
    tr, va = split_indices([str(i) for i in yc], [str(i) for i in range(120)], 0.25, "stratified", 0)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=5e-3, early_stop_patience=0, **options)
    full = train(_toy_head(size="large"), x, yb, yc, tr, va, cfg)
    state = tmp_path / "run.state"
    part = train(_toy_head(size="large"), x, yb, yc, tr, va, cfg, state_path=state, state_every_s=0, stop_after_epoch=3)
    assert len(part.history) == 3 and state.is_file()
    resumed = train(_toy_head(seed=99, size="large"), x, yb, yc, tr, va, cfg, state_path=state, resume=True)
    assert resumed.resumed_from_epoch == 3 and resumed.history == full.history
    for k in full.state:
        assert torch.equal(full.state[k], resumed.state[k]), k
    with pytest.raises(ValueError, match="other data or settings"):
        train(_toy_head(), x, yb, yc, tr, va, TrainConfig(epochs=7, batch_size=16), state_path=state, resume=True)


def test_preference_loss_and_ema_train_and_select_on_the_shadow():
    x, yb, yc = _toy()
    tr, va = split_indices([str(i) for i in yc], [str(i) for i in range(120)], 0.25, "stratified", 0)
    cfg = TrainConfig(
        epochs=8,
        batch_size=16,
        lr=5e-3,
        ema_decay=0.9,
        pref_weight=0.5,
        pref_objective="repo_relu",
        pref_group_size=2,
        pref_group_estimator="epo",
        hard_negative_ratio=0.8,
        adaptive_pref_weighting=True,
        pref_warmup_epochs=1.0,
    )
    res = train(_toy_head(), x, yb, yc, tr, va, cfg)
    assert res.history[-1]["val_response_acc"] == 1.0
    assert res.history[0]["train_pref"] > 0 and "train_ce" in res.history[0]


def test_state_writer_writes_the_first_state_in_line_then_snapshots_on_a_thread_at_most_every_few_seconds(tmp_path):
    from models.checkpoint import load_tree
    from models.state import StateWriter, snapshot

    w = torch.ones(3)
    snap = snapshot({"model": {"w": w}, "rng": (w, 3)})
    assert snap["model"]["w"] is not w and snap["rng"][0] is not w and snap["rng"][1] == 3
    assert torch.equal(snap["model"]["w"], w) and w.untyped_storage().data_ptr() != snap["model"]["w"].untyped_storage().data_ptr()
    writer = StateWriter(tmp_path / "s.state", every_s=0.2)
    assert writer.due()
    writer.save({"epoch": 1, "model": {"w": w}})
    assert writer.thread is None and load_tree(tmp_path / "s.state")["epoch"] == 1  # on disk already
    assert not writer.due()  # the next epochs within 0.2 s write nothing
    time.sleep(0.25)
    assert writer.due()
    writer.save({"epoch": 5, "model": {"w": w}})
    w.add_(1.0)  # the next epoch trains on while the state is written: the file keeps epoch 5's values
    writer.close()
    back = load_tree(tmp_path / "s.state")
    assert back["epoch"] == 5 and torch.equal(back["model"]["w"], torch.ones(3))
    (tmp_path / "a_folder").mkdir()
    bad = StateWriter(tmp_path / "a_folder", every_s=0)  # a folder where the file should go: the write fails
    with pytest.raises(OSError):
        bad.save({"epoch": 1})  # the first, in line
    bad.save({"epoch": 2})  # a later one, on the thread: raised at close
    with pytest.raises(OSError):
        bad.close()


def test_validation_is_capped_at_max_val_rows_and_the_rest_trains():
    keys = [str(i % 4) for i in range(400)]
    ids = [f"r{i}" for i in range(400)]
    tr_all, va_all = split_indices(keys, ids, 0.25, "stratified", seed=0)
    tr, va = split_indices(keys, ids, 0.25, "stratified", seed=0, max_val=30)
    assert len(va_all) == 100 and len(va) == 30
    assert set(va) <= set(va_all)  # the cap keeps a subset of the same validation set
    assert sorted([*tr, *va]) == list(range(400))
