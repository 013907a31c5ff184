"""Quality filters and duplicate removal for merged datasets (``bucketchat build-super``).

Every dropped pair is kept in the rejects file with its reason; ``DropReport`` counts them.

- quality: too short or too long, mostly non-text, assistant equal to user, control characters,
  broken encoding (U+FFFD or UTF-8 read as Latin-1, e.g. "Ã©")
- exact duplicates: equal context, user and assistant after ``normalise``
- near duplicates: the same conversation context and both sides near-identical: character edit
  similarity (Indel ratio, via rapidfuzz) at least ``--near_dup_threshold`` (default 0.9) on the user
  side *and* the assistant side. Candidates come from MinHash LSH (datasketch) over the user side's
  character 3-grams at a loose Jaccard (0.5); each is then verified by edit similarity. Indexing the
  answer too made every row sharing a long answer a candidate (~150 per row on BANKING77). Why not
  Jaccard alone: on short questions one typo costs as many shingles as a rephrasing, so a Jaccard
  threshold that catches typo copies also deletes genuine paraphrases; edit similarity separates them. Requiring both sides keeps different questions that share
  one answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from rapidfuzz import fuzz, process

from conversations.dataset import normalise
from conversations.records import Pair, Reject

_MOJIBAKE = re.compile("[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac")  # "Ã©", "Â ", "â€™": UTF-8 decoded as cp1252/Latin-1
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # Cc, less tab, newline, return
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_SPACE = re.compile(r"\s", re.UNICODE)


@dataclass(frozen=True)
class QualityConfig:
    min_chars: int = 2
    max_user_chars: int = 2000
    max_assistant_chars: int = 8000
    min_text_ratio: float = 0.25  # letters among non-space characters; code answers stay well above
    near_dup_threshold: float = 0.9  # edit similarity both sides must reach
    candidate_jaccard: float = 0.5  # LSH threshold for candidates; loose, since each is verified
    shingle: int = 3
    num_perm: int = 64

    def __post_init__(self):
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(f"--near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}; use 1 to keep near duplicates")
        if self.min_chars < 1 or self.max_user_chars < self.min_chars or self.max_assistant_chars < self.min_chars:
            raise ValueError("length limits must satisfy 1 <= min_chars <= max_*_chars")


@dataclass
class DropReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    linked: int = 0  # near duplicates kept in their twin's family

    def to_dict(self) -> dict:
        out = {"kept": self.kept, "dropped": dict(sorted(self.dropped.items())), "dropped_total": sum(self.dropped.values())}
        return out | ({"near_duplicates_linked": self.linked} if self.linked else {})


@functools.lru_cache(maxsize=200_000)  # responses repeat: check each distinct text once
def _text_problem(side: str, text: str, limit: int, cfg: QualityConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return f"{side} too short"
    if len(text) > limit:
        return f"{side} too long"
    if _CONTROL.search(text):
        return f"{side} has control characters"
    if "\ufffd" in text or _MOJIBAKE.search(text):
        return f"{side} has broken encoding"
    visible = len(text) - len(_SPACE.findall(text))
    if visible and len(_LETTER.findall(text)) / visible < cfg.min_text_ratio:
        return f"{side} mostly non-text"
    return None


def quality_problem(p: Pair, cfg: QualityConfig) -> str | None:
    """The first quality rule ``p`` breaks (a short reason used as the report key), or None."""
    problem = _text_problem("user", p.user, cfg.max_user_chars, cfg) or _text_problem(
        "assistant", p.assistant, cfg.max_assistant_chars, cfg
    )
    if problem is None and normalise(p.user) == normalise(p.assistant):
        problem = "assistant equals user"
    return problem


def similarity(a: str, b: str, at_least: float) -> bool:
    """Whether the edit similarity of two normalised texts reaches ``at_least`` (rapidfuzz's ratio:
    the same Indel measure as difflib's, in C and with an early exit below the cutoff)."""
    return a == b or fuzz.ratio(a, b, score_cutoff=at_least * 100) > 0


_SHIFT = np.uint64(32)


class Signer:
    """MinHash signatures of character n-grams (of the normalised text, punctuation folded to spaces),
    computed for a whole batch of texts in numpy.

    datasketch hashes one token per Python call (SHA-1), which dominated the run time; here a chunk's
    n-grams are hashed with one vectorised rolling hash and reduced per text with ``minimum.reduceat``.
    Permutations are multiply-shift hashes, ((a*h + b) mod 2**64) >> 32 with odd a: universal enough
    for MinHash and free of the uint64 modulo that made the classic (a*h + b) mod p slow in numpy. ``side`` salts the token hash, so a user
    shingle and an assistant shingle never collide; a pair's signature is then the elementwise min of
    its two sides' (the MinHash of a union is the min of the MinHashes), should both be wanted.
    """

    def __init__(self, num_perm: int, n: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.n = n
        self.a = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)

    def _token_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hash of every n-gram of every text, and where each text's n-grams start."""
        padded = [" " + _NON_WORD.sub(" ", normalise(t)).strip() + " " for t in texts]
        padded = [t if len(t) >= self.n else t.ljust(self.n) for t in padded]
        codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        lengths = np.array([len(t) for t in padded])
        ends = np.cumsum(lengths)
        starts = ends - lengths
        h = np.zeros(len(codes) - self.n + 1, dtype=np.uint64)
        for k in range(self.n):  # polynomial rolling hash over n code points, mixed below
            h = h * np.uint64(1000003) + codes[k : len(codes) - self.n + 1 + k]
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        # Keep only n-grams inside one text: each text has len - n + 1 of them, from its start.
        counts = lengths - self.n + 1
        valid = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return h[valid], offsets

    def sign(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint64 signatures."""
        if not texts:
            return np.zeros((0, len(self.a)), dtype=np.uint64)
        hv, offsets = self._token_hashes(texts)
        with np.errstate(over="ignore"):  # wrap-around mod 2**64 is the point
            permuted = (self.a * hv[None, :] + self.b) >> _SHIFT  # (num_perm, tokens)
        return np.minimum.reduceat(permuted, offsets, axis=1).T


def _reject(p: Pair, reason: str) -> Reject:
    return Reject(p.source, p.line, reason, "nothing to fix; the record was filtered out", json.dumps(p.to_record(), ensure_ascii=False))


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def filter_and_dedupe(
    pairs,
    cfg: QualityConfig | None = None,
    on_drop: Callable[[Reject], None] | None = None,
    chunk_size: int = 4096,
    near_duplicates: str = "drop",
) -> tuple[list[Pair], DropReport]:
    """``dedupe_stream`` into a list: (kept pairs, report)."""
    report = DropReport()
    kept = list(dedupe_stream(pairs, report, cfg, on_drop, chunk_size, near_duplicates))
    return kept, report


def dedupe_stream(
    pairs,
    report: DropReport,
    cfg: QualityConfig | None = None,
    on_drop: Callable[[Reject], None] | None = None,
    chunk_size: int = 4096,
    near_duplicates: str = "drop",
) -> Iterator[Pair]:
    """Stream ``pairs`` through quality, exact and near-duplicate filters, yielding what is kept;
    first seen wins. ``report`` counts the drops and, once the stream ends, what was kept.

    ``near_duplicates="link"`` keeps a near duplicate but makes it part of its twin's family
    (``parent_id``), so a train/validation split keeps the twins together: for training data,
    near-identical rows are real phrasings worth keeping, but a twin on each side of the split makes validation too easy.

    Reads ``pairs`` (any iterable) a chunk at a time, so signatures are computed in bulk; memory
    holds one chunk and, per kept pair, its id, its family and (for the near-duplicate check) its
    normalised text and LSH entry, never the pairs themselves. Each dropped pair goes to ``on_drop``
    as it is found (e.g. straight into the rejects file), not into a list.
    """
    from datasketch import LeanMinHash, MinHashLSH

    if near_duplicates not in ("drop", "link"):
        raise ValueError(f"near_duplicates must be 'drop' or 'link', got {near_duplicates!r}")
    cfg = cfg or QualityConfig()
    kept_ids: list[str] = []  # each kept pair's id, and the family (parent) a near twin joins
    families: list[str] = []
    exact: dict[tuple, str] = {}
    near = cfg.near_dup_threshold < 1.0
    # Balanced band weights: recall-weighted bands found few more near duplicates for far more candidates.
    lsh = MinHashLSH(threshold=cfg.candidate_jaccard, num_perm=cfg.num_perm) if near else None
    signer = Signer(cfg.num_perm, cfg.shingle)
    kept_norm: list[tuple[str, str, tuple]] = []  # normalised (user, assistant, context) of each kept pair

    def drop(p: Pair, kind: str, reason: str) -> None:
        report.dropped[kind] += 1
        if on_drop:
            on_drop(_reject(p, reason))

    def first_near(user: str, answer: str, context: tuple, candidates: list[int]) -> int | None:
        """The earliest kept pair among ``candidates`` with the same context that is near on both
        sides, or None. (A turn of a conversation is never a duplicate of a pair without it.)

        The user side is scored for all candidates in one C call (rapidfuzz.process), which matters
        when LSH returns hundreds of candidates: the variants of one parent share most 3-grams.
        """
        if not candidates:
            return None
        candidates = sorted(candidates)
        cutoff = cfg.near_dup_threshold * 100
        hits = process.extract(user, [kept_norm[j][0] for j in candidates], scorer=fuzz.ratio, score_cutoff=cutoff, limit=None)
        for _, _, k in sorted(hits, key=lambda h: h[2]):
            j = candidates[k]
            if kept_norm[j][2] == context and similarity(answer, kept_norm[j][1], cfg.near_dup_threshold):
                return j
        return None

    for chunk in _chunks(pairs, chunk_size):
        fresh = []
        for p in chunk:
            problem = quality_problem(p, cfg)
            if problem:
                drop(p, problem, problem)
                continue
            key = (tuple(normalise(c) for _, c in p.context), normalise(p.user), normalise(p.assistant))
            if key in exact:
                drop(p, "exact duplicate", f"exact duplicate of {exact[key]}")
                continue
            exact[key] = p.id
            fresh.append((p, key))
        if not near:
            report.kept += len(fresh)
            yield from (p for p, _ in fresh)
            continue
        user_sigs = signer.sign([p.user for p, _ in fresh])
        for (p, key), user_sig in zip(fresh, user_sigs):
            sig = LeanMinHash(seed=1, hashvalues=user_sig, scheme="affine32")
            match = first_near(key[1], key[2], key[0], lsh.query(sig))
            if match is not None and near_duplicates == "drop":
                drop(p, "near duplicate", f"near duplicate of {kept_ids[match]}")
                continue
            if match is not None:
                p = dataclasses.replace(p, parent_id=p.parent_id or families[match])
                report.linked += 1
            lsh.insert(len(kept_ids), sig, check_duplication=False)
            kept_ids.append(p.id)
            families.append(p.parent_id or p.id)
            kept_norm.append((key[1], key[2], key[0]))
            report.kept += 1
            yield p
