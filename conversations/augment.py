"""Synthetic variants of conversation pairs, to grow a small dataset to ``--target`` records.

Each variant keeps the parent's response (and context) and rewrites the user side in a way that keeps
its meaning; it records ``parent_id`` and the ``op`` that made it. Deterministic for a seed.

- user-side ops: ``synonym`` (phrase substitutions that keep meaning: "how do I" -> "how can I",
  "can't" -> "cannot", ...), ``frame`` (question frames), ``filler`` (politeness/filler words),
  ``reorder`` (swap two clauses around a comma), ``casing``, ``punct`` (punctuation), ``typo`` (one
  swap of adjacent letters in a longer word)
- ``creative`` (probability ``--creative_prob``): the assistant side gets a conversational opener,
  leaving its content verbatim
- ``blend`` (probability ``--blend_prob``): two user messages that share a response are joined into
  one message (people often ask twice in one breath); the shared response stays

Variants that change meaning hurt, so each batch is checked for label consistency (see
``ConsistencyFilter``) and the dropped ones are counted by reason.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import numpy as np

from conversations.dataset import normalise
from conversations.records import Pair

FRAMES = (
    "Can you tell me {q}",
    "I was wondering, {q}",
    "Quick question: {q}",
    "Could you help me? {q}",
    "{q} Thanks in advance.",
    "Hey, {q}",
)
# Where people actually put filler: in front of the question, or after it.
PREFIXES = ("Actually, ", "Just wondering, ", "By the way, ", "Hi, ", "Um, ")
SUFFIXES = (" please", ", thanks", " asap", " if possible")
OPENERS = ("Sure! ", "Happy to help. ", "Good question. ", "Of course. ")
# Phrase groups whose members mean the same in a question; matched on word boundaries, any case.
SYNONYMS = (
    ("how do i", "how can i", "how should i", "what's the way to"),
    ("can't", "cannot", "can not", "am unable to"),
    ("don't", "do not"),
    ("isn't", "is not"),
    ("doesn't", "does not"),
    ("i want to", "i would like to", "i'd like to", "i need to"),
    ("where is", "where's"),
    ("what is", "what's"),
    ("please", "pls", "kindly"),
    ("help me", "assist me"),
    ("quickly", "fast"),
    ("get", "obtain"),
    ("change", "modify", "update"),
    ("find", "locate"),
    ("buy", "purchase"),
    ("start", "begin"),
    ("fix", "repair", "sort out"),
    ("problem", "issue"),
)
_SYN_INDEX = {phrase: group for group in SYNONYMS for phrase in group}
_SYN_RE = re.compile(r"\b(" + "|".join(sorted((re.escape(p) for p in _SYN_INDEX), key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if len(text) > 1 and not text[:2].isupper() else text


def _frame(text: str, rng: random.Random) -> str:
    frame = rng.choice(FRAMES)
    # Mid-sentence the question starts lower case; after "?" or at the start it keeps its capital.
    mid_sentence = not (frame.startswith("{q}") or "? {q}" in frame)
    return frame.format(q=_lower_first(text) if mid_sentence else text)


def _filler(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(PREFIXES) + _lower_first(text)
    bare = text.rstrip("?!. ")
    return bare + rng.choice(SUFFIXES) + text[len(bare) :].strip()


def _synonym(text: str, rng: random.Random) -> str:
    matches = list(_SYN_RE.finditer(text))
    if not matches:
        return _frame(text, rng)
    m = rng.choice(matches)
    found = m.group(0)
    choice = rng.choice([p for p in _SYN_INDEX[found.lower()] if p != found.lower()])
    choice = re.sub(r"\bi\b", "I", choice)  # the pronoun stays upper case
    if found[:1].isupper():
        choice = choice[:1].upper() + choice[1:]
    return text[: m.start()] + choice + text[m.end() :]


def _reorder(text: str, rng: random.Random) -> str:
    """ "If X, how do I Y?" -> "How do I Y, if X?": two clauses, same meaning, other order."""
    parts = [p.strip() for p in text.rstrip("?!. ").split(",")]
    if len(parts) != 2 or not all(parts):
        return _filler(text, rng)
    end = text.rstrip()[-1] if text.rstrip()[-1:] in "?!." else ""
    first, second = parts[1], _lower_first(parts[0])
    return f"{first[:1].upper()}{first[1:]}, {second}{end}"


def _casing(text: str, rng: random.Random) -> str:
    return rng.choice((text.lower(), text[:1].upper() + text[1:].lower()))


def _punct(text: str, rng: random.Random) -> str:
    bare = text.rstrip("?!. ")
    return bare + rng.choice(("", "?", "??", ".", "!"))


def _typo(text: str, rng: random.Random) -> str:
    words = text.split()
    long_words = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long_words:
        return _punct(text, rng)
    i = rng.choice(long_words)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


USER_OPS: dict[str, Callable[[str, random.Random], str]] = {
    "synonym": _synonym,
    "frame": _frame,
    "filler": _filler,
    "reorder": _reorder,
    "casing": _casing,
    "punct": _punct,
    "typo": _typo,
}
_SPACE = re.compile(r"\s+")


def variant(parent: Pair, siblings: list[Pair], rng: random.Random, creative_prob: float, blend_prob: float) -> Pair:
    """One new pair derived from ``parent``; ``siblings`` share its response (for ``blend``)."""
    ops, user, assistant = [], parent.user, parent.assistant
    others = [s for s in siblings if s.user != parent.user]
    if others and rng.random() < blend_prob:
        user = f"{user.rstrip('?!. ')}? {rng.choice(others).user}"
        ops.append("blend")
    else:
        name = rng.choice(list(USER_OPS))
        user = USER_OPS[name](user, rng)
        ops.append(name)
    if rng.random() < creative_prob:
        assistant = rng.choice(OPENERS) + assistant
        ops.append("creative")
    return dataclasses.replace(
        parent, user=_SPACE.sub(" ", user).strip(), assistant=assistant, op="+".join(ops), parent_id=parent.id, turn=0
    )


class ConsistencyFilter:
    """Does a variant still ask what its parent asked? A cheap proxy for meaning, fast enough for
    100k variants: hashed character 3-4-gram TF-IDF-free vectors (unit length), compared by cosine.

    A variant is dropped when it *drifted* (cosine to its parent below ``min_parent_similarity``) or
    when it is *nearer another response*: the centroid of some other response's askings beats its own
    response's centroid by more than ``margin``. (Sentence embeddings would judge meaning better but
    cost ~3 ms per text here: six minutes for 120k variants.)
    """

    def __init__(self, pairs: list[Pair], min_parent_similarity: float = 0.3, margin: float = 0.05):
        from scipy import sparse
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.preprocessing import normalize

        self.vec = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 4), n_features=2**18, alternate_sign=False, norm="l2")
        self.min_parent, self.margin = min_parent_similarity, margin
        self.response_of = {}
        responses = {}
        for p in pairs:
            self.response_of.setdefault(p.id, responses.setdefault(normalise(p.assistant), len(responses)))
        self.parent_row = {p.id: i for i, p in enumerate(pairs)}
        self.X = self.vec.transform([p.user for p in pairs])  # (N, F)
        rows = np.array([self.response_of[p.id] for p in pairs])
        member = sparse.csr_matrix((np.ones(len(pairs)), (rows, np.arange(len(pairs)))), shape=(len(responses), len(pairs)))
        self.centroids = normalize(member @ self.X).T.tocsc()  # (F, R)

    def check(self, variants: list[Pair]) -> list[str | None]:
        """Per variant: None to keep it, else the reason it is dropped."""
        if not variants:
            return []
        V = self.vec.transform([v.user for v in variants])  # (B, F)
        parents = self.X[[self.parent_row[v.parent_id] for v in variants]]
        to_parent = np.asarray(V.multiply(parents).sum(axis=1)).ravel()  # (B,)
        scores = (V @ self.centroids).toarray()  # (B, R)
        own = np.array([self.response_of[v.parent_id] for v in variants])
        own_score = scores[np.arange(len(variants)), own]
        scores[np.arange(len(variants)), own] = -1.0
        reasons = []
        for sim, mine, best in zip(to_parent, own_score, scores.max(axis=1)):
            if sim < self.min_parent:
                reasons.append("drifted from its parent")
            elif best > mine + self.margin:
                reasons.append("nearer another response")
            else:
                reasons.append(None)
        return reasons


def expand(
    pairs: list[Pair],
    target: int,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    seed: int = 42,
    max_tries_per_record: int = 50,
    check: bool = True,
) -> tuple[list[Pair], Counter]:
    """``expand_stream`` into a list: (exactly ``target`` pairs, variants dropped by reason)."""
    dropped: Counter = Counter()
    out = list(expand_stream(pairs, target, dropped, creative_prob, blend_prob, seed, max_tries_per_record, check))
    return out, dropped


def expand_stream(
    pairs: list[Pair],
    target: int,
    dropped: Counter,
    creative_prob: float = 0.0,
    blend_prob: float = 0.0,
    seed: int = 42,
    max_tries_per_record: int = 50,
    check: bool = True,
) -> Iterator[Pair]:
    """Yield exactly ``target`` pairs (the originals first, then new distinct variants); ``dropped``
    counts the variants the consistency check dropped, by reason. Only the inputs and each output's
    normalised text (the distinctness check) are held, never the output pairs: they can be written as
    they come.

    Raises ``ValueError`` when ``target`` is below the input size or the input cannot yield enough
    distinct, consistent variants (e.g. a handful of one-word messages asked to become thousands).
    """
    for name, p in (("--creative_prob", creative_prob), ("--blend_prob", blend_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {p}")
    if not pairs:
        raise ValueError("the input has no usable records to expand; check its rejects file")
    if target < len(pairs):
        raise ValueError(
            f"--target {target} is below the input's {len(pairs)} records; pass --target >= {len(pairs)} (expansion never drops records)"
        )
    rng = random.Random(seed)
    by_response: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_response[normalise(p.assistant)].append(p)
    seen = {(normalise(p.user), normalise(p.assistant)) for p in pairs}
    consistency = ConsistencyFilter(pairs) if check and target > len(pairs) else None
    yield from pairs
    made = len(pairs)
    tries, limit = 0, max_tries_per_record * target
    while made < target:
        # A batch a little larger than what is missing: the check runs vectorised per batch.
        batch, exhausted = [], False
        while len(batch) < min(50_000, int((target - made) * 1.2) + 16):
            tries += 1
            if tries > limit:
                exhausted = True
                break
            parent = pairs[rng.randrange(len(pairs))]
            child = variant(parent, by_response[normalise(parent.assistant)], rng, creative_prob, blend_prob)
            key = (normalise(child.user), normalise(child.assistant))
            if key not in seen:
                seen.add(key)
                batch.append(child)
        reasons = consistency.check(batch) if consistency else [None] * len(batch)
        for child, reason in zip(batch, reasons):
            if reason:
                dropped[reason] += 1
            elif made < target:
                yield dataclasses.replace(child, line=made)
                made += 1
        if exhausted and made < target:
            raise ValueError(
                f"could only make {made} distinct consistent records from {len(pairs)} inputs after {limit} tries ({sum(dropped.values())} variants failed the consistency check); lower --target to at most {made} or add more varied data"
            )
