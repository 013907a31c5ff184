import pytest

from retrieval.answer import FALLBACK_RESPONSE, ChatEngine, ChatOptions
from tests.conftest import INTENTS


@pytest.fixture
def model(chat_model):
    return chat_model


@pytest.mark.parametrize("name", list(INTENTS))
def test_answers_paraphrases_with_the_stored_response(model, name):
    engine = ChatEngine(*model)
    question = {
        "reset_password": "I can't log in, I forgot the password",
        "track_order": "where's my package right now",
        "boil_egg": "how many minutes should eggs boil",
        "undo_commit": "how can I undo a git commit",
    }[name]
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


def test_the_saved_index_answers_as_one_built_from_the_rows_in_memory(model):
    import json
    from pathlib import Path

    import numpy as np

    from retrieval.index_files import index_dir, index_from_arrays
    from retrieval.store import open_table, read_columns

    saved = ChatEngine(*model)  # the table's version has its index beside it (made once, by now)
    pinned = json.loads(Path(model[1]).read_text())["table"]
    assert (index_dir(pinned["db"], pinned["name"], pinned["version"]) / "index.json").is_file()
    assert isinstance(saved.index.vectors.base, np.memmap)
    rows = read_columns(
        open_table(pinned["db"], pinned["name"], pinned["version"]), ["id", "user", "assistant", "bucket", "group", "source", "vector"]
    )
    payload = {c: rows[c].to_pylist() for c in ("id", "user", "assistant", "group", "source")}
    built = ChatEngine(*model)
    built.index = index_from_arrays(
        np.stack(rows["vector"].to_numpy(zero_copy_only=False)), payload["user"], rows["bucket"].to_numpy(), payload
    )
    assert list(built.index.payload["assistant"]) == list(saved.index.payload["assistant"])
    for q in ("do you sell gift cards?", "I forgot my password", "where is my parcel", "zzz qqq"):
        a, b = saved.answer(q), built.answer(q)
        assert (a.response, a.bucket, a.fallback, a.candidates) == (b.response, b.bucket, b.fallback, b.candidates)
    assert saved.answer("do you sell gift cards?").candidates[0]["from"].startswith("table:")
    records = saved.sources("Yes, gift cards from 10 to 200 euros are in the shop.")
    assert [r["user"] for r in records] == ["do you sell gift cards"] and records[0]["source"] == "d"


def test_a_chat_turn_needs_neither_lancedb_nor_scikit_learn(model):
    """What a chat process imports before its first answer is what it waits for (~1.4 s LanceDB,
    ~0.7 s scikit-learn); with the index saved beside the version it needs neither."""
    import subprocess
    import sys

    ChatEngine(*model)  # the index exists from here on
    code = (
        "import sys; from retrieval.answer import ChatEngine; "
        f"e = ChatEngine({model[0]!r}, {model[1]!r}); e.answer('do you sell gift cards?'); e.sources(e.answer('hi').chosen or ''); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lancedb', 'sklearn', 'pyarrow', 'scipy', 'pandas', 'mlflow', 'prefect'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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


def test_a_follow_up_is_read_with_the_previous_turn(model):
    from retrieval.answer import Conversation, is_follow_up

    assert is_follow_up("and how long does that take?") and is_follow_up("what about it?")
    assert not is_follow_up("How long do I boil an egg for a runny yolk?")
    convo = Conversation(ChatEngine(*model))
    first = convo.say("I forgot my password")
    follow = convo.say("and what about that?")
    assert follow.context == "I forgot my password"
    assert follow.response == first.response == INTENTS["reset_password"][0]
    # the same words without the conversation are not read in context
    assert ChatEngine(*model).answer("and what about that?").context is None
    convo.reset()
    assert convo.history == [] and convo.say("and what about that?").context is None
    # a standalone question after a topic is answered on its own
    convo.say("where is my order?")
    assert convo.say("How long do I boil an egg?").response == INTENTS["boil_egg"][0]


def test_margin_threshold_falls_back_when_two_answers_are_close(model):
    ans = ChatEngine(*model).answer("I forgot my password")
    assert 0 < ans.margin <= ans.confidence
    assert not ans.fallback
    close = ChatEngine(*model, ChatOptions(min_margin=min(1.0, ans.margin + 1e-3))).answer("I forgot my password")
    assert close.fallback and close.response == FALLBACK_RESPONSE and close.chosen == INTENTS["reset_password"][0]


def test_similarity_gate_falls_back_on_a_message_unlike_every_stored_one(model):
    engine = ChatEngine(*model)
    near, far = engine.answer("I forgot my password"), engine.answer("who won the football world cup in 1954?")
    assert near.similarity is not None and far.similarity is not None and far.similarity < near.similarity
    gate = (far.similarity + near.similarity) / 2
    strict = ChatEngine(*model, ChatOptions(min_similarity=gate))
    assert not strict.answer("I forgot my password").fallback
    gated = strict.answer("who won the football world cup in 1954?")
    assert gated.fallback and gated.response == FALLBACK_RESPONSE and gated.similarity == far.similarity
    with pytest.raises(ValueError, match="--min_similarity must be a cosine similarity"):
        ChatOptions(min_similarity=1.5)


def test_styles_transform_the_chosen_response_and_never_swap_it(model):
    base = ChatEngine(*model).answer("How long do I boil an egg?")
    assert base.style == "balanced" and base.response == INTENTS["boil_egg"][0]
    for style in ("concise", "analyst", "creative"):
        a = ChatEngine(*model, ChatOptions(style_mode=style, creativity=1.0)).answer("How long do I boil an egg?")
        assert a.style == style and a.chosen == base.response
    creative = ChatEngine(*model, ChatOptions(style_mode="creative", creativity=1.0)).answer("How long do I boil an egg?")
    assert base.response in creative.response and creative.response != base.response
    auto = ChatEngine(*model, ChatOptions(style_mode="auto"))
    assert auto.answer("briefly: how long do I boil an egg?").style == "concise"
    assert auto.answer("explain how long to boil an egg").style == "analyst"
    assert auto.answer("How long do I boil an egg?").style == "balanced"


def test_explain_names_buckets_candidates_and_their_source_records(model):
    engine = ChatEngine(*model)
    ans = engine.answer("how do I track my package")
    why = engine.explain(ans)
    probs = [b["probability"] for b in why["buckets"]]
    assert why["buckets"][0]["bucket"] == ans.bucket and len(probs) == 3 and probs == sorted(probs, reverse=True)
    top = why["candidates"][0]
    assert top["response"] == INTENTS["track_order"][0]
    assert {r["user"] for r in top["records"]} <= set(INTENTS["track_order"][1]) and len(top["records"]) == 3
    assert why["thresholds"] == {"min_confidence": 0.0, "min_margin": 0.0, "min_similarity": 0.0}
    assert why["similarity"] == ans.similarity


def test_model_size_auto_accepts_the_checkpoint_and_a_wrong_size_is_refused(model):
    assert ChatEngine(*model, ChatOptions(model_size="auto")).head.cfg.model_size == "base"
    assert ChatEngine(*model, ChatOptions(model_size="base"))
    with pytest.raises(ValueError, match="checkpoint is a base head; pass --model_size auto or base"):
        ChatEngine(*model, ChatOptions(model_size="xlarge"))


def test_search_is_skipped_only_when_it_cannot_change_the_answer(model):
    engine = ChatEngine(*model)
    sure = engine.answer("I forgot my password")
    assert not sure.searched and sure.response == INTENTS["reset_password"][0]
    # the gift-card response is only in the table: its bucket's "other" slot beats every learned one
    gift = engine.answer("do you sell gift cards?")
    assert gift.searched and gift.response.startswith("Yes, gift cards")
    # an explicit --llm_db or sampling always searches
    assert ChatEngine(*model, ChatOptions(response_temperature=0.5)).answer("I forgot my password").searched


def test_a_retrieved_response_gets_the_summed_share_of_its_rows(tmp_path):
    """Rows of a response the head did not learn share their bucket's "other" slot; a response asked
    four ways gets the four rows' shares together, not the best single row's (which made it fall back)."""
    from tests.conftest import GIFT_CARDS, train_chat_model

    records = [{"user": u, "assistant": r, "intent": n} for n, (r, asks) in INTENTS.items() for u in asks]
    records += [
        {"user": u, "assistant": GIFT_CARDS, "intent": "track_order"}
        for u in ("do you sell gift cards", "can I buy a gift card", "gift card for a friend", "are gift cards available")
    ]
    engine = ChatEngine(*train_chat_model(tmp_path, records))
    q = "do you sell gift cards?"
    ans = engine.answer(q)
    assert ans.searched and ans.chosen == GIFT_CARDS and ans.candidates[0]["from"].startswith("table:")
    slot = float(answer_probs(engine, q)[engine.candidates.other[ans.bucket]])
    assert ans.confidence == pytest.approx(slot, rel=0.02)  # all four rows' shares: the whole slot


def answer_probs(engine: ChatEngine, q: str, weight: float | None = None):
    """p(response) of ``q`` as chat should score it: the head's, with the vote of the ``k`` nearest
    rows of the engine's table mixed in (retrieval/neighbours.py, tested on its own)."""
    import numpy as np
    import torch

    from retrieval.encoder import embed
    from retrieval.neighbours import mix, vote

    vec = embed([q], encoder_id=engine.encoder_id)
    with torch.no_grad():
        _, log_pr = engine.head.response_log_probs(torch.from_numpy(vec), engine.head.lex([q]))
    log_pr = log_pr.numpy()
    weight = engine.neighbour_weight if weight is None else weight
    if weight > 0:
        cos, pos = engine.index.nearest(vec[0], engine.neighbour_k)
        log_pr = mix(log_pr, vote(cos[None], engine.row_slot[pos][None], log_pr.shape[1], engine.neighbour_temperature), weight)
    return np.exp(log_pr[0])


def test_answers_mix_in_the_vote_of_the_nearest_stored_messages(model, tmp_path):
    import json
    from pathlib import Path

    from conversations.records import load_records
    from retrieval.build import build_table
    from tests.conftest import write_jsonl

    engine = ChatEngine(*model)
    assert (engine.neighbour_weight, engine.neighbour_k) == (0.2, 10) and engine.index is not None
    q = "how do I get back into my account"
    ans = engine.answer(q)
    voted, alone = answer_probs(engine, q), answer_probs(engine, q, weight=0.0)
    j = engine.candidates.index[ans.chosen]
    assert ans.confidence == pytest.approx(float(voted[j]), abs=1e-4) and abs(voted[j] - alone[j]) > 1e-3
    # A meta with the vote off (or one from before it) answers from the head alone.
    meta = json.loads(Path(model[1]).read_text(encoding="utf-8"))
    meta["neighbours"]["weight"] = 0.0
    (tmp_path / "off.json").write_text(json.dumps(meta), encoding="utf-8")
    assert ChatEngine(model[0], str(tmp_path / "off.json")).answer(q).confidence == pytest.approx(float(alone[j]), abs=1e-4)
    # Rows of another --llm_db do not vote for this head's candidates.
    pairs, _ = load_records(
        write_jsonl(
            tmp_path / "other.jsonl", [{"user": "hello there", "assistant": "Hi!"}, {"user": "good morning", "assistant": "Morning!"}]
        )
    )
    build_table(pairs, tmp_path / "other_db", "conversations")
    assert ChatEngine(*model, ChatOptions(llm_db=str(tmp_path / "other_db"))).neighbour_weight == 0.0


def test_sampling_never_trips_the_margin_gate_of_a_sure_message(model):
    sure = ChatEngine(*model).answer("I forgot my password")
    engine = ChatEngine(*model, ChatOptions(response_temperature=50.0, min_margin=sure.margin * 0.9, seed=1))
    answers = [engine.answer("I forgot my password") for _ in range(20)]
    assert len({a.chosen for a in answers}) > 1  # hot sampling picks other responses too
    assert not any(a.fallback for a in answers)  # but the message itself is one the model is sure of
    assert all(a.margin == sure.margin for a in answers)
