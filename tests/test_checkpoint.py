import json
import pickle

import pytest
import torch

from models import checkpoint
from models.config import HeadConfig
from models.heads import BucketHead


def _head():
    torch.manual_seed(0)
    return BucketHead(HeadConfig(num_candidates=3, input_dim=8, hidden_dim=16), torch.tensor([0, 1, 1])).eval()


def _meta():
    return {"candidates": {"texts": ["a", "b", "c"], "buckets": [0, 1, 1], "counts": [1, 1, 1]}}


def test_round_trip_gives_identical_logits(tmp_path):
    head = _head()
    checkpoint.save(head, _meta(), tmp_path / "w.pth", tmp_path / "m.json")
    loaded, meta = checkpoint.load(tmp_path / "w.pth", tmp_path / "m.json")
    x = torch.randn(4, 8)
    assert torch.equal(head(x)[0], loaded(x)[0]) and torch.equal(head(x)[1], loaded(x)[1])
    assert meta["head_config"]["num_candidates"] == 3 and meta["format"] == checkpoint.META_FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "w.pth"]  # no temp files left


def test_legacy_tensor_pth_loads_but_pickled_objects_are_refused(tmp_path):
    head = _head()
    torch.save(head.state_dict(), tmp_path / "legacy.pth")
    assert set(checkpoint.load_state(tmp_path / "legacy.pth")) == set(head.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="neither safetensors nor a tensors-only"):
        checkpoint.load_state(tmp_path / "evil.pth")


def test_mismatched_or_bad_meta_is_a_clear_error(tmp_path):
    checkpoint.save(_head(), _meta(), tmp_path / "w.pth", tmp_path / "m.json")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["head_config"]["hidden_dim"] = 32
    (tmp_path / "m2.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit --meta"):
        checkpoint.load(tmp_path / "w.pth", tmp_path / "m2.json")
    (tmp_path / "m3.json").write_text("{nope")
    with pytest.raises(ValueError, match="is not valid JSON"):
        checkpoint.load(tmp_path / "w.pth", tmp_path / "m3.json")


def test_tampered_or_truncated_weights_are_refused(tmp_path):
    checkpoint.save(_head(), _meta(), tmp_path / "w.pth", tmp_path / "m.json")
    raw = bytearray((tmp_path / "w.pth").read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor's data: still a valid safetensors file
    (tmp_path / "t.pth").write_bytes(bytes(raw))
    assert set(checkpoint.load_state(tmp_path / "t.pth")) == set(_head().state_dict())
    with pytest.raises(ValueError, match="tensor digest mismatch"):
        checkpoint.load(tmp_path / "t.pth", tmp_path / "m.json")
    (tmp_path / "cut.pth").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="damaged safetensors file"):
        checkpoint.load(tmp_path / "cut.pth", tmp_path / "m.json")
    # Another model's weights under this meta: same shapes, other values.
    torch.manual_seed(1)
    other = BucketHead(HeadConfig(num_candidates=3, input_dim=8, hidden_dim=16), torch.tensor([0, 1, 1]))
    checkpoint.save(other, _meta(), tmp_path / "o.pth", tmp_path / "o.json")
    with pytest.raises(ValueError, match="tensor digest mismatch"):
        checkpoint.load(tmp_path / "o.pth", tmp_path / "m.json")


def test_a_pickle_where_safetensors_is_expected_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint.save(_head(), _meta(), tmp_path / "w.pth", tmp_path / "m.json")
    with open(tmp_path / "w.pth", "wb") as fh:  # the champion's file replaced by a pickle
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="neither safetensors nor a tensors-only"):
        checkpoint.load(tmp_path / "w.pth", tmp_path / "m.json")
    assert not marker.exists()


def test_state_trees_round_trip_without_pickle(tmp_path):
    """Resume states: nested dicts (int keys), lists, tuples, numbers, strings and tensors."""
    head = _head()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(torch.randn(2, 8))[0].sum().backward()
    opt.step()
    tree = {
        "model": head.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "score": (0.5, float("inf")),
        "history": "[]",
        "none": None,
        "rng": torch.get_rng_state(),
    }
    checkpoint.save_tree(tree, tmp_path / "s.state")
    back = checkpoint.load_tree(tmp_path / "s.state")
    assert back["epoch"] == 3 and back["score"] == (0.5, float("inf")) and back["none"] is None and back["history"] == "[]"
    assert list(back["optimizer"]["state"]) == list(opt.state_dict()["state"])  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == opt.state_dict()["param_groups"][0]["betas"]
    assert all(torch.equal(back["model"][k], v) for k, v in head.state_dict().items())
    torch.optim.AdamW(head.parameters(), lr=1e-3).load_state_dict(back["optimizer"])  # loads as torch expects
    # The file is written tensor by tensor (no copies); safetensors' own loader reads every dtype and
    # shape back exactly, views and empty tensors included.
    odd = {
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "view": torch.arange(12.0).reshape(3, 4)[:, 1],
        "empty": torch.zeros(0, 4),
    }
    checkpoint.save_tree(odd, tmp_path / "odd.state")
    back = checkpoint.load_tree(tmp_path / "odd.state")
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v) for k, v in odd.items())


def test_a_pickled_resume_state_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "run.state", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="not a readable bucketchat state file"):
        checkpoint.load_tree(tmp_path / "run.state")
    assert not marker.exists()
