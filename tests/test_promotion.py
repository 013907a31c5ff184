"""tasks/promotion.py's coverage rule: a challenger that learned a response the champion never did
(a reviewed topic) is the better bot unless it is measurably worse on the rest; a real champion
checkpoint answers real table rows."""

from retrieval.build import build_table
from tasks.promotion import answers, coverage_gain
from tests.conftest import INTENTS, write_jsonl

JET_LAG = "Shift your sleep an hour a day before you fly and get morning daylight where you land."


def test_a_challenger_that_covers_a_new_topic_wins_unless_measurably_worse(chat_model, tmp_path):
    from conversations.records import load_records

    weights, meta = chat_model
    old = [{"user": u, "assistant": resp} for resp, asks in INTENTS.values() for u in asks]
    new = [{"user": u, "assistant": JET_LAG} for u in ("tips for jet lag", "how to beat jet lag", "jet lag remedies")]
    pairs, _ = load_records(write_jsonl(tmp_path / "d.jsonl", old + new))
    db = str(tmp_path / "db")
    version = build_table(pairs, db, "conversations").version
    old_ids, new_ids = [p.id for p in pairs[:8]], [p.id for p in pairs[-3:]]
    champion = answers(weights, meta, db, "conversations", version, old_ids + new_ids)
    assert [champion[i] for i in new_ids] == [False] * 3  # it never learned the response
    assert sum(champion[i] for i in old_ids) >= 6
    val_ids = old_ids + new_ids

    def gain(old_right, new_right):
        return coverage_gain(weights, meta, db, "conversations", version, val_ids, old_right + new_right)

    same = [champion[i] for i in old_ids]
    assert gain(same, [True, True, False]) == (
        "it answers 2 of 3 validation rows whose response the champion never learned, and on the other 8 it is not measurably worse (0 answers lost, 0 won)"
    )
    assert gain(same, [False, False, False]) is None  # nothing new answered
    # Wrong wherever the champion is right: 6+ answers lost, none won, beyond the noise of the sign test.
    assert gain([False] * 8, [True, True, True]) is None
    one_lost = same.copy()
    one_lost[same.index(True)] = False
    assert "(1 answers lost, 0 won)" in gain(one_lost, [True, True, True])
