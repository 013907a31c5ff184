import pytest

from retrieval.answer import FALLBACK_RESPONSE, ChatEngine, ChatOptions
from retrieval.store import build_table
from tasks.records import load_records
from tasks.training import fit
from models import checkpoint
from models.train import TrainConfig
from tests.conftest import INTENTS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("answer")
    import json

    records = [{"user": u, "assistant": resp, "intent": name} for name, (resp, asks) in INTENTS.items() for u in asks]
    # One unlabelled, rare response that the head does not learn (max 1 candidate per bucket below):
    # only retrieval can return it.
    records.append({"user": "do you sell gift cards", "assistant": "Yes, gift cards from 10 to 200 euros are in the shop.", "intent": "track_order"})
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs, _ = load_records(tmp / "d.jsonl")
    res = build_table(pairs, tmp / "db", "conversations")
    head, meta, _ = fit(str(tmp / "db"), "conversations", res.version, TrainConfig(epochs=40, lr=5e-3, val_split=0.0, max_candidates_per_bucket=1), {"hidden_dim": 64, "dropout": 0.0})
    checkpoint.save(head, meta, tmp / "w.safetensors", tmp / "m.json")
    return str(tmp / "w.safetensors"), str(tmp / "m.json")


@pytest.mark.parametrize("name", list(INTENTS))
def test_answers_paraphrases_with_the_stored_response(model, name):
    engine = ChatEngine(*model)
    question = {"reset_password": "I can't log in, I forgot the password", "track_order": "where's my package right now",
                "boil_egg": "how many minutes should eggs boil", "undo_commit": "how can I undo a git commit"}[name]
    ans = engine.answer(question)
    assert ans.response == INTENTS[name][0]
    assert not ans.fallback and 0 < ans.confidence <= 1
    assert ans.candidates[0]["response"] == ans.response and ans.candidates[0]["from"] == "learned"


def test_retrieval_reaches_responses_the_head_did_not_learn(model):
    engine = ChatEngine(*model)
    assert engine.searches_table  # not every response is a learned candidate
    ans = engine.answer("do you sell gift cards?")
    assert ans.response == "Yes, gift cards from 10 to 200 euros are in the shop."
    assert ans.candidates[0]["from"].startswith("table:")


def test_low_confidence_falls_back(model):
    engine = ChatEngine(*model, ChatOptions(min_confidence=0.999999))
    ans = engine.answer("what's the airspeed of an unladen swallow")
    assert ans.fallback and ans.response == FALLBACK_RESPONSE


def test_sampling_is_seeded_and_top_pool_restricts_buckets(model):
    a = ChatEngine(*model, ChatOptions(response_temperature=5.0, seed=3))
    b = ChatEngine(*model, ChatOptions(response_temperature=5.0, seed=3))
    qs = ["forgot password", "boil egg", "track order", "undo commit"] * 3
    assert [a.answer(q).response for q in qs] == [b.answer(q).response for q in qs]
    top = ChatEngine(*model, ChatOptions(pool_mode="top", top_labels=1))
    ans = top.answer("how long do I boil an egg")
    assert {c["bucket"] for c in ans.candidates} == {ans.bucket}


def test_options_are_validated():
    with pytest.raises(ValueError, match="--pool_mode"):
        ChatOptions(pool_mode="some")
    with pytest.raises(ValueError, match="--response_temperature"):
        ChatOptions(response_temperature=-1)
