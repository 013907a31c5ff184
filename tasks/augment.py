"""Synthetic variants of conversation pairs, to grow a small dataset to ``--target`` records.

Each variant keeps the parent's response (and context) and rewrites the user side in a way that keeps
its meaning; it records ``parent_id`` and the ``op`` that made it. Deterministic for a seed.

- user-side ops: ``frame`` (question frames), ``filler`` (politeness/filler words), ``casing``,
  ``punct`` (punctuation), ``typo`` (one adjacent-key swap in a longer word)
- ``creative`` (probability ``--creative_prob``): the assistant side gets a conversational opener,
  leaving its content verbatim
- ``blend`` (probability ``--blend_prob``): two user messages that share a response are joined into
  one message (people often ask twice in one breath); the shared response stays
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import defaultdict
from typing import Callable

from tasks.dataset import normalise
from tasks.records import Pair

FRAMES = ("Can you tell me {q}", "I was wondering, {q}", "Quick question: {q}", "Could you help me? {q}", "{q} Thanks in advance.", "Hey, {q}")
FILLERS = ("please", "actually", "just", "by the way")
OPENERS = ("Sure! ", "Happy to help. ", "Good question. ", "Of course. ")


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if len(text) > 1 and not text[:2].isupper() else text


def _frame(text: str, rng: random.Random) -> str:
    return rng.choice(FRAMES).format(q=_lower_first(text))


def _filler(text: str, rng: random.Random) -> str:
    words = text.split()
    words.insert(rng.randrange(1, len(words) + 1) if len(words) > 1 else 1, rng.choice(FILLERS))
    return " ".join(words)


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


USER_OPS: dict[str, Callable[[str, random.Random], str]] = {"frame": _frame, "filler": _filler, "casing": _casing, "punct": _punct, "typo": _typo}
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
    return dataclasses.replace(parent, user=_SPACE.sub(" ", user).strip(), assistant=assistant, op="+".join(ops), parent_id=parent.id, turn=0)


def expand(pairs: list[Pair], target: int, creative_prob: float = 0.0, blend_prob: float = 0.0, seed: int = 42, max_tries_per_record: int = 50) -> list[Pair]:
    """Return exactly ``target`` pairs: the originals first, then new distinct variants.

    Raises ``ValueError`` when ``target`` is below the input size or the input cannot yield enough
    distinct variants (e.g. a handful of one-word messages asked to become thousands).
    """
    for name, p in (("--creative_prob", creative_prob), ("--blend_prob", blend_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {p}")
    if not pairs:
        raise ValueError("the input has no usable records to expand; check its rejects file")
    if target < len(pairs):
        raise ValueError(f"--target {target} is below the input's {len(pairs)} records; pass --target >= {len(pairs)} (expansion never drops records)")
    rng = random.Random(seed)
    by_response: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_response[normalise(p.assistant)].append(p)
    seen = {(normalise(p.user), normalise(p.assistant)) for p in pairs}
    out = list(pairs)
    tries, limit = 0, max_tries_per_record * target
    while len(out) < target:
        tries += 1
        if tries > limit:
            raise ValueError(f"could only make {len(out)} distinct records from {len(pairs)} inputs after {limit} tries; lower --target or add more varied data")
        parent = pairs[rng.randrange(len(pairs))]
        child = variant(parent, by_response[normalise(parent.assistant)], rng, creative_prob, blend_prob)
        key = (normalise(child.user), normalise(child.assistant))
        if key not in seen:
            seen.add(key)
            out.append(dataclasses.replace(child, line=len(out)))
    return out
