import pytest

from conversations.augment import expand
from conversations.dataset import normalise
from conversations.records import load_records


def test_expand_reaches_exact_target_deterministically(tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    a, _ = expand(pairs, 120, creative_prob=0.3, blend_prob=0.3, seed=1)
    b, _ = expand(pairs, 120, creative_prob=0.3, blend_prob=0.3, seed=1)
    assert len(a) == 120
    assert a == b
    assert a[: len(pairs)] == pairs
    assert len({(normalise(p.user), normalise(p.assistant)) for p in a}) == 120


def test_variants_carry_provenance_and_keep_response_content(tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    by_id = {p.id: p for p in pairs}
    grown, _ = expand(pairs, 80, creative_prob=0.5, seed=3)
    for child in grown[len(pairs) :]:
        parent = by_id[child.parent_id]
        assert child.op != "original"
        assert child.assistant.endswith(parent.assistant)  # creative adds an opener, never new content
        assert child.label == parent.label and child.context == parent.context
    assert len({p.id for p in grown}) == 80


def test_expand_refuses_to_shrink_or_bad_probabilities(tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    with pytest.raises(ValueError, match="--target 3 is below the input's 26 records"):
        expand(pairs, 3)
    with pytest.raises(ValueError, match="--blend_prob must be between 0 and 1"):
        expand(pairs, 30, blend_prob=2)


def test_consistency_check_drops_variants_that_change_meaning(tiny_jsonl):
    from conversations.augment import ConsistencyFilter
    from conversations.records import Pair

    pairs, _ = load_records(tiny_jsonl)
    check = ConsistencyFilter(pairs)
    egg = next(p for p in pairs if p.user == "How long do I boil an egg?")
    same = Pair("How long do I boil an egg please?", egg.assistant, parent_id=egg.id, op="filler")
    hijacked = Pair("How long do I track my package order?", egg.assistant, parent_id=egg.id, op="synonym")
    unrelated = Pair("zzz qqq xxx", egg.assistant, parent_id=egg.id, op="typo")
    assert check.check([same, hijacked, unrelated]) == [None, "nearer another response", "drifted from its parent"]


def test_expand_reports_dropped_variants(tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    _, dropped = expand(pairs, 150, blend_prob=0.5, seed=0)
    assert set(dropped) <= {"drifted from its parent", "nearer another response"}


def test_impossible_targets_fail_clearly():
    from conversations.records import Pair

    pairs = [Pair("hi", "hello"), Pair("yo", "hey")]  # two one-word messages cannot become 500
    with pytest.raises(ValueError, match="lower --target to at most"):
        expand(pairs, 500, max_tries_per_record=2)


def test_expand_stream_yields_as_it_makes_and_matches_expand(tiny_jsonl):
    from collections import Counter

    from conversations.augment import expand_stream

    pairs, _ = load_records(tiny_jsonl)
    dropped: Counter = Counter()
    stream = expand_stream(pairs, 90, dropped, creative_prob=0.3, seed=5)
    # The originals come out before a single variant is drawn: the output is never held.
    assert [next(stream) for _ in pairs] == pairs
    rest = list(stream)
    grown, dropped_list = expand(pairs, 90, creative_prob=0.3, seed=5)
    assert pairs + rest == grown and dropped == dropped_list
    assert [p.line for p in rest] == list(range(len(pairs), 90))
