"""Review (retrieval/review.py, interfaces/review.py, interfaces/review_api.py): which turns need a
person, grouping by similarity, decisions as a drop the pipeline reads back (out of scope included),
the ledger that keeps decided turns out of the next review, and the web view's API."""

import json
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from conversations.dataset import read_pairs
from conversations.records import OUT_OF_SCOPE
from interfaces.server import ServerConfig
from retrieval.answer import ChatEngine
from retrieval.review import Decision, Group, drop_records, group, pending, reviewed, write_decisions
from retrieval.turn_log import TurnLog, read_turns
from tests.conftest import INTENTS, running_server

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _turn(i: int, message: str, fallback=False, confidence=0.9, feedback=None) -> dict:
    return {
        "turn": f"t{i}",
        "message": message,
        "conversation": f"c{i % 2}",
        "time": T0 + timedelta(minutes=i),
        "fallback": fallback,
        "confidence": confidence,
        "feedback": feedback,
    }


class _Turns:
    """What read_turns returns, for the parts pending reads."""

    def __init__(self, rows):
        self.rows = rows

    def to_pylist(self):
        return self.rows


def test_pending_keeps_fallbacks_thumbs_down_and_unsure_answers_not_yet_decided():
    rows = [
        _turn(0, "sure and right"),
        _turn(1, "fell back", fallback=True, confidence=0.9),
        _turn(2, "rated bad", feedback="bad"),
        _turn(3, "unsure", confidence=0.3),
        _turn(4, "rated good", confidence=0.3, feedback="good"),
        _turn(5, "decided already", fallback=True),
    ]
    todo = pending(_Turns(rows), below=0.5, reviewed={"t5"})
    assert [(t["turn"], t["_reasons"]) for t in todo] == [
        ("t1", ["fallback"]),
        ("t2", ["rated bad"]),
        ("t3", ["low confidence"]),  # t4 is as unsure, but a person rated it good
    ]
    assert [t["turn"] for t in pending(_Turns(rows), below=0.0)] == ["t1", "t2", "t5"]
    assert [t["turn"] for t in pending(_Turns(rows), below=0.5, limit=2)] == ["t3", "t5"]  # the newest


def test_groups_follow_similarity_biggest_first_and_repeats_count_once_for_the_clustering():
    # Two topics on orthogonal axes, each message a small tilt away; a third topic asked once.
    def unit(v):
        v = np.asarray(v, dtype=np.float32)
        return v / np.linalg.norm(v)

    messages = ["a1", "a2", "a1", "a3", "b1", "b2", "c1"]
    vec = {"a1": unit([1, 0.1, 0]), "a2": unit([1, 0, 0.1]), "a3": unit([1, 0.05, 0.05]), "b1": unit([0, 1, 0.1]), "b2": unit([0.1, 1, 0])}
    vec["c1"] = unit([0, 0, 1])
    turns = [_turn(i, m, fallback=True) for i, m in enumerate(messages)]
    groups = group(turns, np.stack([vec[m] for m in messages]), similarity=0.5)
    assert [[t["turn"] for t in g.turns] for g in groups] == [["t0", "t1", "t2", "t3"], ["t4", "t5"], ["t6"]]
    assert groups[0].messages == [("a1", 2), ("a2", 1), ("a3", 1)]
    assert groups[0].reasons == {} and groups[0].key == Group(list(reversed(groups[0].turns))).key  # the key ignores order
    # A cut above every pair's similarity leaves each distinct message alone.
    assert len(group(turns, np.stack([vec[m] for m in messages]), similarity=0.9999)) == 6
    assert group([], np.zeros((0, 3)), 0.5) == []


def test_decisions_become_a_drop_the_pipeline_reads_and_a_ledger_that_hides_the_turns(tmp_path):
    topic = Group([{**_turn(1, "jet lag tips"), "_reasons": ["fallback"]}, {**_turn(2, "jet lag tips"), "_reasons": ["fallback"]}])
    other = Group([{**_turn(3, "who won the 1954 world cup?"), "_reasons": ["fallback"]}])
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    decisions = [Decision(topic, "new", "Shift your sleep before you fly."), Decision(other, "out_of_scope")]
    assert drop_records(decisions, "ana", at) == [
        {
            "user": "jet lag tips",
            "assistant": "Shift your sleep before you fly.",
            "review_decision": "new",
            "reviewed_by": "ana",
            "reviewed_at": "2026-12-03T12:00:00+00:00",
            "review_group": topic.key,
            "turns": ["t1", "t2"],
            "conversations": ["c0", "c1"],
        },
        {
            "user": "who won the 1954 world cup?",
            "out_of_scope": True,
            "review_decision": "out_of_scope",
            "reviewed_by": "ana",
            "reviewed_at": "2026-12-03T12:00:00+00:00",
            "review_group": other.key,
            "turns": ["t3"],
            "conversations": ["c1"],
        },
    ]
    drop = write_decisions(decisions, tmp_path / "drops", tmp_path / "log", "ana")
    assert drop.parent == tmp_path / "drops" and drop.name.startswith("review-") and drop.suffix == ".jsonl"
    pairs, rejects = read_pairs(drop)
    assert rejects == []
    assert [(p.user, p.assistant) for p in pairs] == [
        ("jet lag tips", "Shift your sleep before you fly."),
        ("who won the 1954 world cup?", OUT_OF_SCOPE),
    ]
    assert pairs[0].meta["reviewed_by"] == "ana" and pairs[0].meta["turns"] == ["t1", "t2"]
    assert reviewed(tmp_path / "log") == {"t1", "t2", "t3"}
    assert write_decisions([], tmp_path / "drops", tmp_path / "log", "ana") is None


def test_a_decision_needs_a_response_unless_out_of_scope():
    g = Group([_turn(1, "x")])
    with pytest.raises(ValueError, match="needs the response text"):
        Decision(g, "new", "  ")
    with pytest.raises(ValueError, match="decision must be one of existing, new, out_of_scope"):
        Decision(g, "maybe", "text")
    assert Decision(g, "out_of_scope", "ignored").response is None


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"user": "x y", "out_of_scope": false}', "field 'out_of_scope' must be true when present"),
        (
            '{"user": "x y", "assistant": "a b", "out_of_scope": true}',
            "an out-of-scope record has no 'assistant': the bot falls back on it",
        ),
        ('{"out_of_scope": true}', "missing field 'user'"),
    ],
)
def test_bad_out_of_scope_records_are_rejected_with_the_reason(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user": "fine", "assistant": "ok then"}\n' + line + "\n")
    pairs, rejects = read_pairs(path)
    assert len(pairs) == 1 and [(r.line, r.reason) for r in rejects] == [(2, reason)]


def test_out_of_scope_pairs_round_trip_through_the_dataset_format(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user": "who won the cup?", "out_of_scope": true, "note": "kept"}\n')
    (pair,), _ = read_pairs(path)
    assert pair.assistant == OUT_OF_SCOPE and pair.to_record()["out_of_scope"] is True and "assistant" not in pair.to_record()


def test_the_web_review_lists_groups_and_writes_a_decision_once(chat_model, tmp_path):
    engine = ChatEngine(*chat_model)
    engine.turn_log = TurnLog(tmp_path / "log", model="m", table="t", table_version=1, source="serve")
    drops = tmp_path / "drops"
    try:
        with running_server(engine, ServerConfig(drop_dir=str(drops))) as url:
            asked = ["who won the football world cup in 1954?", "which team won the 1954 football world cup?"]
            for q in asked:
                r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": q}]}, timeout=30)
                assert r.status_code == 200
            # An answer the model is sure of is not listed.
            httpx.post(
                f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": INTENTS["boil_egg"][1][0]}]}, timeout=30
            )
            listed = httpx.get(f"{url}/v1/review", timeout=60).json()
            assert listed["total"] == 1 and listed["drop_dir"] == str(drops)
            (g,) = listed["groups"]
            assert sorted(m["message"] for m in g["messages"]) == sorted(asked) and g["turns"] == 2 and g["suggestions"]
            assert httpx.get(f"{url}/v1/review?max_groups=0").status_code == 400
            bad = httpx.post(f"{url}/v1/review", json={"group": g["key"], "decision": "new"}, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "response"
            done = httpx.post(f"{url}/v1/review", json={"group": g["key"], "decision": "out_of_scope", "reviewer": "bo"}, timeout=30).json()
            assert done["turns"] == 2 and done["records"] == 2
            records = [json.loads(l) for l in open(done["drop"])]
            assert {r["user"] for r in records} == set(asked) and all(r["out_of_scope"] and r["reviewed_by"] == "bo" for r in records)
            again = httpx.post(f"{url}/v1/review", json={"group": g["key"], "decision": "out_of_scope"}, timeout=30)
            assert again.status_code == 409 and again.json()["error"]["code"] == "stale_group"
            assert httpx.get(f"{url}/v1/review", timeout=60).json()["total"] == 0
            assert "<title>bucketchat · review</title>" in httpx.get(f"{url}/review").text
            # Listing asked the model for suggestions; those answers are not users' turns.
            assert len(read_turns(tmp_path / "log")) == 3
    finally:
        engine.turn_log.close()


def test_the_web_review_needs_the_log(chat_model):
    engine = ChatEngine(*chat_model)
    with running_server(engine) as url:
        r = httpx.get(f"{url}/v1/review")
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_log"


def test_answer_exposes_the_gates_evaluation_shares(chat_model):
    engine = ChatEngine(*chat_model)
    engine.min_confidence, engine.min_margin = 0.5, 0.1
    assert engine.unsure(0.4, 0.5, "x") and engine.unsure(0.9, 0.05, "x") and engine.unsure(0.99, 0.9, OUT_OF_SCOPE)
    assert not engine.unsure(0.9, 0.5, "x")


def test_a_topic_marked_out_of_scope_is_learned_and_its_paraphrases_fall_back(tmp_path):
    from tests.conftest import train_chat_model

    football = [
        "who won the football world cup in 1954?",
        "which country has won the most world cups",
        "who is the best football player of all time",
        "when is the next football world cup",
        "who won the world cup final in 1990",
        "how many goals did pele score",
    ]
    records = [{"user": u, "assistant": resp} for resp, asks in INTENTS.values() for u in asks]
    records += [{"user": q, "out_of_scope": True, "reviewed_by": "test"} for q in football]
    engine = ChatEngine(*train_chat_model(tmp_path, records))
    caught = engine.answer("who won the 2010 football world cup?")
    assert caught.fallback and caught.chosen == OUT_OF_SCOPE and caught.response == engine.opts.fallback_response
    kept = engine.answer("I forgot my password")
    assert not kept.fallback and kept.response == INTENTS["reset_password"][0]


def test_find_responses_searches_every_stored_response_by_its_words(chat_model):
    from retrieval.review import find_responses

    engine = ChatEngine(*chat_model)
    assert find_responses(engine, "TRACK orders") == [INTENTS["track_order"][0]]
    assert find_responses(engine, "gift cards") == ["Yes, gift cards from 10 to 200 euros are in the shop."]  # only in the table
    assert find_responses(engine, "no such words anywhere") == []


def test_the_review_command_asks_again_when_a_response_is_refused(chat_model, tmp_path, monkeypatch, capsys):
    import io
    import sys

    from interfaces.cli import main
    from retrieval.answer import Answer
    from retrieval.turn_log import turns_folder

    weights, meta = chat_model
    log = TurnLog(turns_folder(tmp_path / "db"), model="m", table="conversations", table_version=1, source="chat")
    for q in ("who won the 1954 world cup?", "which team won the 1954 world cup?"):
        log.record(q, Answer(response="fallback", bucket=0, confidence=0.1, fallback=True), conversation="c")
    log.close()
    # A response of control characters only is empty once repaired: refused, and the person asked again.
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n\x01\x02\nn\nWest Germany won it.\n"))
    args = ["review", "--weights", weights, "--meta", meta, "--db", str(tmp_path / "db"), "--drop_dir", str(tmp_path / "drops")]
    assert main([*args, "--reviewer", "ana"]) == 0
    out = capsys.readouterr().out
    assert "the response is empty" in out and "1 decision(s) on 2 turns written to" in out
    (drop,) = (tmp_path / "drops").glob("review-*.jsonl")
    assert {json.loads(l)["assistant"] for l in drop.read_text().splitlines()} == {"West Germany won it."}
    assert main([*args, "--max_groups", "0"]) == 2
