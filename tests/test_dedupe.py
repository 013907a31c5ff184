"""Quality filters and dedupe, with planted exact duplicates, near duplicates and near-misses."""

import random
from pathlib import Path

import pytest

from conversations.dataset import normalise
from conversations.dedupe import _NON_WORD, QualityConfig, Signer, filter_and_dedupe, quality_problem, similarity
from conversations.records import Pair, load_records


def shingles(text: str, n: int) -> set[str]:
    """The exact n-gram sets that ``Signer`` signs (normalised, punctuation folded to spaces)."""
    t = " " + _NON_WORD.sub(" ", normalise(text)).strip() + " "
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


SAMPLE = Path(__file__).resolve().parents[1] / "conversation_data.sample.jsonl"


@pytest.mark.parametrize(
    "user, assistant, problem",
    [
        ("hi", "x", "assistant too short"),
        ("a" * 2001, "fine answer", "user too long"),
        ("ok so\x07", "fine answer", "user has control characters"),
        ("caf\ufffd opening hours", "fine answer", "user has broken encoding"),
        ("cafÃ© opening hours", "fine answer", "user has broken encoding"),
        ("12345 678 !!!", "fine answer", "user mostly non-text"),
        ("Same text", "same  TEXT", "assistant equals user"),
        ("multi\nline\tis fine", "`pip install x` then run it", None),
    ],
)
def test_quality_rules(user, assistant, problem):
    assert quality_problem(Pair(user, assistant), QualityConfig()) == problem


def _typo(text: str, rng: random.Random) -> str:
    words = text.split()
    i = max(range(len(words)), key=lambda k: len(words[k]))
    w = words[i]
    j = rng.randrange(1, len(w) - 2) if len(w) > 3 else 0
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def planted(seed: int = 0):
    """Unique sample pairs, then per chosen row: an exact duplicate (case and spacing), a near
    duplicate (a typo and other punctuation) and two near-misses that must be kept: the same question
    with a different answer, and the question with its longest word swapped, with a different answer."""
    base, _ = load_records(SAMPLE)
    seen, unique = set(), []
    for p in base:
        if p.user.lower() not in seen and not p.context:
            seen.add(p.user.lower())
            unique.append(p)
    # The base must be duplicate-free by the rule itself (the sample has one such pair: "create" vs
    # "activate a virtual environment", same answer), or "every original is kept" is not planted.
    unique, _ = filter_and_dedupe(unique)
    rng = random.Random(seed)
    chosen = rng.sample(unique, 60)
    answers = sorted({p.assistant for p in unique})
    exact = [Pair("  " + p.user.upper() + " ", p.assistant, source="exact", line=i) for i, p in enumerate(chosen)]
    near = [Pair(_typo(p.user, rng).rstrip("?") + "!", p.assistant, source="near", line=i) for i, p in enumerate(chosen)]
    vocab = sorted({w.strip("?.,!") for p in unique for w in p.user.split() if len(w.strip("?.,!")) > 4})

    def swap(text: str) -> str:
        words = text.split()
        i = max(range(len(words)), key=lambda k: len(words[k]))
        words[i] = rng.choice([v for v in vocab if v.lower() != words[i].strip("?.,!").lower()])
        return " ".join(words)

    other = lambda p: rng.choice([a for a in answers if a != p.assistant])  # noqa: E731
    miss = [Pair(p.user, other(p), source="miss", line=i) for i, p in enumerate(chosen)]
    miss += [Pair(swap(p.user), other(p), source="miss", line=100 + i) for i, p in enumerate(chosen)]
    return unique, exact, near, miss


def test_planted_duplicates_precision_and_recall():
    unique, exact, near, miss = planted()
    drops = []
    kept, report = filter_and_dedupe(unique + exact + near + miss, on_drop=drops.append)
    dropped_sources = [r.path for r in drops]
    # Every original is kept, every exact duplicate dropped, no near-miss dropped.
    assert {id(p) for p in unique} <= {id(p) for p in kept}
    assert dropped_sources.count("exact") == len(exact)
    assert dropped_sources.count("miss") == 0
    recall = dropped_sources.count("near") / len(near)
    false_drops = dropped_sources.count("miss") + sum(1 for p in unique if id(p) not in {id(k) for k in kept})
    precision = dropped_sources.count("near") / max(1, dropped_sources.count("near") + false_drops)
    print(f"near-duplicate recall {recall:.3f}, precision {precision:.3f} ({len(near)} planted, {len(miss)} near-misses)")
    assert recall >= 0.95 and precision == 1.0
    assert report.dropped["exact duplicate"] == len(exact)
    assert report.kept == len(kept) == len(unique) + len(miss) + len(near) - dropped_sources.count("near")


def test_near_duplicate_needs_both_sides_close():
    a = Pair("How do I reset my password?", "Use Settings > Security.")
    typo = Pair("How do I reest my password", "Use Settings > Security.")
    other_question = Pair("How do I reset my PIN?", "Use Settings > Security.")
    kept, report = filter_and_dedupe([a, typo, other_question])
    assert kept == [a, other_question]
    assert dict(report.dropped) == {"near duplicate": 1}
    assert not similarity("how do i reset my password?", "how do i reset my pin?", 0.9)


def test_paraphrases_are_not_near_duplicates():
    """Rewordings share many shingles but are different askings: training needs them."""
    a = Pair("Can I track the card you sent to me?", "Track it in the app.")
    b = Pair("What can I do to track the card you sent me?", "Track it in the app.")
    kept, _ = filter_and_dedupe([a, b])
    assert kept == [a, b]


def test_signatures_estimate_jaccard():
    signer = Signer(num_perm=256, n=3)
    texts = ["How do I reset my password?", "how do i reset my pasword", "Where is my parcel?"]
    sig = signer.sign(texts)
    est = (sig[0] == sig[1]).mean()
    assert abs(est - jaccard(shingles(texts[0], 3), shingles(texts[1], 3))) < 0.1
    assert (sig[0] == sig[2]).mean() < 0.15


def test_threshold_one_keeps_near_duplicates_and_bad_threshold_is_named():
    a, b = Pair("How do I reset my password?", "x y z"), Pair("How do I reest my password", "x y z")
    kept, _ = filter_and_dedupe([a, b], QualityConfig(near_dup_threshold=1.0))
    assert kept == [a, b]
    with pytest.raises(ValueError, match="--near_dup_threshold"):
        QualityConfig(near_dup_threshold=0)


def test_exact_duplicates_ignore_case_and_space_but_not_context():
    a = Pair("Hi there", "hello", source="s", line=1)
    b = Pair("hi   THERE", "Hello", source="s", line=2)
    c = Pair("hi there", "hello", context=(("user", "x"),), source="s", line=3)
    drops = []
    kept, report = filter_and_dedupe([a, b, c], QualityConfig(near_dup_threshold=1.0), on_drop=drops.append)
    assert kept == [a, c]
    assert [(r.line, r.reason) for r in drops] == [(2, "exact duplicate of s:1:0")]
    assert report.to_dict() == {"kept": 2, "dropped": {"exact duplicate": 1}, "dropped_total": 1}


def test_a_conversation_turn_is_not_a_near_duplicate_of_a_pair_without_its_context():
    flat = Pair("How do I reset my password?", "Use Settings > Security.")
    turn = Pair("how do I reset my password", "Use Settings > Security.", context=(("user", "hi"), ("assistant", "hello")))
    typo_flat = Pair("How do I reset my pasword", "Use Settings > Security.")
    kept, report = filter_and_dedupe([flat, turn, typo_flat])
    assert kept == [flat, turn]
    assert dict(report.dropped) == {"near duplicate": 1}


def test_link_mode_keeps_near_duplicates_in_their_twins_family():
    a = Pair("How do I reset my password?", "Use Settings.", source="s", line=1)
    b = Pair("How do I reset my pasword", "Use Settings.", source="s", line=2)
    kept, report = filter_and_dedupe([a, b], near_duplicates="link")
    assert [p.user for p in kept] == [a.user, b.user]
    assert kept[1].parent_id == "s:1:0" and kept[1].id == "s:2:0"
    assert report.linked == 1 and report.to_dict()["near_duplicates_linked"] == 1


def test_dedupe_stream_yields_a_chunk_at_a_time_and_counts_as_it_goes():
    from conversations.dedupe import DropReport, dedupe_stream

    unique, exact, _, _ = planted()
    read = []

    def source():
        for p in unique + exact:
            read.append(p)
            yield p

    report = DropReport()
    stream = dedupe_stream(source(), report, chunk_size=16)
    first = next(stream)
    # Kept pairs come out after one chunk is read, not after the whole input.
    assert first is unique[0] and len(read) == 16
    rest = list(stream)
    assert [first, *rest] == filter_and_dedupe(unique + exact)[0]
    assert report.kept == len(unique) and report.dropped["exact duplicate"] == len(exact)
