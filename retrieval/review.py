"""Review: the logged turns a person should look at, grouped so one new topic is one decision, and
the decisions written as a data drop the ``retrain`` deployment learns from (DESIGN.md, "Review").

A turn needs a person when the bot fell back, someone rated its answer bad, or it answered with
less than ``below`` confidence. Such turns are grouped by what was asked: average-linkage
clustering of their message vectors, cut where a group's mean cosine similarity would fall under
``similarity``, so two hundred askings of one new topic come as one group, biggest first.

For a group a person picks a stored response (the engine's candidates for its messages are the
suggestions), writes a new one, or marks it out of scope. Each decision becomes one record per
distinct message of the group, with its provenance (the turns, who, when), in a JSONL file in the
drop folder; out-of-scope decisions are ``{"user": ..., "out_of_scope": true}`` records, which the
head learns as a response of its own that gives the fallback (conversations/records.py). The turns
decided are written to a ledger beside the log (``_turns/reviewed-*.jsonl``) so they are not shown
again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.atomic import write_text

DECISIONS = ("existing", "new", "out_of_scope")
SIMILARITY = 0.5  # chosen on BANKING77's train split (tests/bench/review.py): ~92 % of a group is one intent
BELOW = 0.5  # an answer less sure than this is worth a look even when it did not fall back
MAX_TURNS = 5000  # the newest turns grouped at once: the clustering holds N^2 / 2 distances


@dataclass
class Group:
    """Turns that asked about one thing, newest last."""

    turns: list[dict]
    key: str = ""  # stable id: a hash of its turn ids, so the web view names the group it decides

    def __post_init__(self):
        if not self.key:
            self.key = hashlib.sha256(" ".join(sorted(t["turn"] for t in self.turns)).encode()).hexdigest()[:12]

    @property
    def messages(self) -> list[tuple[str, int]]:
        """Distinct messages with how often each was asked, most asked first."""
        return Counter(t["message"] for t in self.turns).most_common()

    @property
    def reasons(self) -> dict[str, int]:
        """How many turns are here for each reason (a turn may have more than one)."""
        return dict(Counter(why for t in self.turns for why in t.get("_reasons", [])))

    def to_dict(self, suggestions: list[dict] | None = None) -> dict:
        times = [t["time"] for t in self.turns]
        return {
            "key": self.key,
            "turns": len(self.turns),
            "reasons": self.reasons,
            "first": min(times).isoformat(),
            "last": max(times).isoformat(),
            "messages": [{"message": m, "count": n} for m, n in self.messages],
            "suggestions": suggestions or [],
        }


def reasons(turn: dict, below: float) -> list[str]:
    """Why ``turn`` needs a person: "fallback", "rated bad", "low confidence" (none: it does not)."""
    out = []
    if turn["fallback"]:
        out.append("fallback")
    if turn.get("feedback") == "bad":
        out.append("rated bad")
    # An unsure answer a person rated good needs no second look.
    if not turn["fallback"] and turn.get("feedback") != "good" and turn["confidence"] is not None and turn["confidence"] < below:
        out.append("low confidence")
    return out


def pending(turns, below: float = BELOW, reviewed: set[str] | None = None, limit: int = MAX_TURNS) -> list[dict]:
    """The turns (rows of ``read_turns``) that need a person and have not been decided yet, at
    most the newest ``limit``, oldest first."""
    reviewed = reviewed or set()
    out = []
    for t in turns.to_pylist():
        why = reasons(t, below)
        if why and t["turn"] not in reviewed:
            out.append({**t, "_reasons": why})
    return out[-limit:]


def group(turns: list[dict], vectors: np.ndarray, similarity: float = SIMILARITY) -> list[Group]:
    """Group ``turns`` (with one unit vector per turn's message) by what they asked, biggest group
    first (ties: the most recently asked first). Identical messages are clustered once."""
    if not turns:
        return []
    texts = [t["message"] for t in turns]
    first = {}
    for i, m in enumerate(texts):
        first.setdefault(m, i)
    distinct = list(first)
    if len(distinct) == 1:
        labels = np.zeros(1, dtype=np.int64)
    else:
        from scipy.cluster.hierarchy import fcluster, linkage

        vecs = vectors[[first[m] for m in distinct]].astype(np.float64)
        # Cosine distance of unit vectors; average linkage keeps a group's mean similarity above the
        # cut, where single linkage chains one topic into the next through a few in-between messages.
        tree = linkage(vecs, method="average", metric="cosine")
        labels = fcluster(tree, t=1.0 - similarity, criterion="distance")
    of_message = dict(zip(distinct, labels.tolist()))
    members: dict[int, list[dict]] = {}
    for t in turns:
        members.setdefault(of_message[t["message"]], []).append(t)
    groups = [Group(ts) for ts in members.values()]
    return sorted(groups, key=lambda g: (-len(g.turns), -max(t["time"] for t in g.turns).timestamp()))


def suggestions(engine, grp: Group, limit: int = 5, asked: int = 20) -> list[dict]:
    """The stored responses the model leans to for the group's messages (its candidates, probability
    averaged over the ``asked`` most asked messages), best first: what a person picks from."""
    from conversations.records import OUT_OF_SCOPE

    totals: Counter = Counter()
    messages = [m for m, _ in grp.messages[:asked]]
    for m in messages:
        ans = engine.answer(m, log=False)  # asking on the person's behalf is not a user's turn
        for c in ans.candidates:
            if c["response"] != OUT_OF_SCOPE:
                totals[c["response"]] += float(np.exp(c["score"]))
    return [{"response": r, "probability": round(p / len(messages), 4)} for r, p in totals.most_common(limit)]


def find_responses(engine, words: str, limit: int = 5) -> list[str]:
    """Stored responses containing every one of ``words`` (case-insensitive): for a response the
    suggestions missed."""
    from conversations.records import OUT_OF_SCOPE

    wanted = words.lower().split()
    return [r for r in engine.responses() if r != OUT_OF_SCOPE and all(w in r.lower() for w in wanted)][:limit]


@dataclass
class Decision:
    """What a person decided for a group: ``kind`` is "existing" (a stored ``response``), "new" (a
    ``response`` they wrote) or "out_of_scope"."""

    group: Group
    kind: str
    response: str | None = None
    label: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        from conversations.text import clean_text

        if self.kind not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {self.kind!r}")
        if self.kind == "out_of_scope":
            self.response = None
        elif not isinstance(self.response, str) or not self.response.strip():
            raise ValueError(f"a {self.kind!r} decision needs the response text; write one, or mark the group out of scope")
        else:
            self.response = clean_text(self.response, "the response")


def drop_records(decisions: list[Decision], reviewer: str, at: datetime | None = None) -> list[dict]:
    """The training records the decisions make: one per distinct message of each group, with the
    turns it came from, the reviewer and the time."""
    at = at or datetime.now(UTC)
    out = []
    for d in decisions:
        for message, _ in d.group.messages:
            turns = [t for t in d.group.turns if t["message"] == message]
            rec: dict = {"user": message}
            if d.kind == "out_of_scope":
                rec["out_of_scope"] = True
            else:
                rec["assistant"] = d.response
            if d.label:
                rec["label"] = d.label
            rec.update(
                {
                    "review_decision": d.kind,
                    "reviewed_by": reviewer,
                    "reviewed_at": at.isoformat(timespec="seconds"),
                    "review_group": d.group.key,
                    "turns": [t["turn"] for t in turns],
                    "conversations": sorted({t["conversation"] for t in turns if t["conversation"]}),
                    **d.extra,
                }
            )
            out.append(rec)
    return out


def write_decisions(decisions: list[Decision], drop_dir: str | Path, log_folder: str | Path, reviewer: str) -> Path | None:
    """Write the decisions as one drop (``review-TIME-ID.jsonl``, atomically) and mark their turns
    reviewed in the log's ledger; returns the drop's path (None: nothing decided)."""
    if not decisions:
        return None
    at = datetime.now(UTC)
    stamp = f"{at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    drop = Path(drop_dir) / f"review-{stamp}.jsonl"
    drop.parent.mkdir(parents=True, exist_ok=True)
    write_text(drop, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in drop_records(decisions, reviewer, at)))
    ledger = [
        {"turn": t["turn"], "decision": d.kind, "drop": str(drop.resolve()), "by": reviewer, "at": at.isoformat(timespec="seconds")}
        for d in decisions
        for t in d.group.turns
    ]
    Path(log_folder).mkdir(parents=True, exist_ok=True)
    write_text(Path(log_folder) / f"reviewed-{stamp}.jsonl", "".join(json.dumps(r) + "\n" for r in ledger))
    return drop


def reviewed(log_folder: str | Path) -> set[str]:
    """The turns already decided (the ledger ``write_decisions`` keeps)."""
    done = set()
    for path in sorted(Path(log_folder).glob("reviewed-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done.add(json.loads(line)["turn"])
    return done


def pending_groups(engine, log_folder: str | Path, below: float = BELOW, similarity: float = SIMILARITY, since: datetime | None = None):
    """The groups of undecided turns in the log at ``log_folder`` that need a person (turns from
    ``since`` on, when given), biggest first, embedded with the model's own encoder."""
    from retrieval.encoder import embed
    from retrieval.turn_log import read_turns

    turns = read_turns(log_folder)
    if since is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        turns = turns.filter(pc.greater_equal(turns["time"], pa.scalar(since, pa.timestamp("us", tz="UTC"))))
    todo = pending(turns, below, reviewed(log_folder))
    vectors = embed([t["message"] for t in todo], device=engine.opts.device, path=engine.encoder_path, encoder_id=engine.encoder_id)
    return group(todo, vectors, similarity)
