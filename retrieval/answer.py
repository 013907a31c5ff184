"""Answering a message with a stored response (DESIGN.md §4).

p(bucket) and p(response) come from the head over the message embedding, with the vote of the
nearest stored messages mixed into p(response) (retrieval/neighbours.py); the learned candidates are
scored in memory. The pinned table adds responses the head did not learn (hybrid BM25 + vector
search over the version's saved index, memory-mapped: retrieval/search.py, retrieval/index_files.py): those of a bucket share the probability of that bucket's
"other" slot, split by similarity among the retrieved rows of that bucket (rows of a foreign
``--llm_db`` share their bucket's probability). The best-scoring response wins (or one is sampled
with ``response_temperature`` > 0). Too little confidence, too small a lead over the runner-up, or
a message unlike every stored one (cosine similarity to the nearest) gives the fallback answer
instead of a wrong one; the three thresholds are calibrated on validation data at training time. So
does a message whose best response is ``OUT_OF_SCOPE``: a topic a reviewer marked out of scope. A style (retrieval/styles.py) is applied last.

A short follow-up ("and how long does that take?") is read together with the previous user turn.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from conversations.records import OUT_OF_SCOPE
from conversations.text import MAX_MESSAGE_CHARS, clean_text, clean_turns
from models import checkpoint
from models.candidates import Candidates
from retrieval.encoder import TORCH_ID, embed
from retrieval.index_files import distinct, open_index
from retrieval.locations import db_key
from retrieval.neighbours import TEMPERATURE as NEIGHBOURS_TEMPERATURE
from retrieval.neighbours import K as NEIGHBOURS_K
from retrieval.neighbours import mix, vote
from retrieval.styles import apply_style

FALLBACK_RESPONSE = "I'm not sure I can answer that. Could you rephrase it, or ask about something I was trained on?"
# Softmax temperature turning cosine similarities of retrieved rows into a distribution.
RETRIEVAL_TEMPERATURE = 0.05


@dataclass
class ChatOptions:
    device: str = "cpu"
    model_size: str = "auto"  # auto: whatever the checkpoint is; a size: refuse a checkpoint of another
    pool_mode: str = "all"
    top_labels: int = 3
    response_temperature: float = 0.0
    llm_db: str | None = None
    db_top_k: int = 20
    min_confidence: float | None = None  # None: the calibrated value in the meta
    min_margin: float | None = None  # None: the calibrated value in the meta (0 for older models)
    min_similarity: float | None = None  # None: the calibrated value in the meta (0 for older models)
    style_mode: str = "balanced"
    creativity: float = 0.35
    history_turns: int = 1  # earlier user turns a short follow-up is read with
    seed: int = 0
    fallback_response: str = FALLBACK_RESPONSE

    def __post_init__(self):
        from models.config import SIZES
        from retrieval.styles import STYLES

        if self.model_size not in ("auto", *SIZES):
            raise ValueError(
                f"--model_size {self.model_size!r} is not available; choose auto (read it from the checkpoint) or one of {', '.join(SIZES)}"
            )
        if self.pool_mode not in ("all", "top"):
            raise ValueError(f"--pool_mode must be 'all' or 'top', got {self.pool_mode!r}")
        if self.top_labels < 1:
            raise ValueError(f"--top_labels must be at least 1, got {self.top_labels}")
        if self.response_temperature < 0:
            raise ValueError(f"--response_temperature must be >= 0 (0 = always the best response), got {self.response_temperature}")
        if self.db_top_k < 1:
            raise ValueError(f"--db_top_k must be at least 1, got {self.db_top_k}")
        if self.style_mode not in STYLES:
            raise ValueError(f"--style_mode {self.style_mode!r} is not available; choose one of {', '.join(STYLES)}")
        if not 0.0 <= self.creativity <= 1.0:
            raise ValueError(f"--creativity must be in [0, 1], got {self.creativity}")
        for flag, value in (("--min_confidence", self.min_confidence), ("--min_margin", self.min_margin)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{flag} must be a probability in [0, 1], got {value}")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"--min_similarity must be a cosine similarity in [-1, 1] (0 turns the gate off), got {self.min_similarity}")
        if self.history_turns < 0:
            raise ValueError(f"--history_turns must be 0 (no context) or more, got {self.history_turns}")


@dataclass
class Answer:
    response: str
    bucket: int
    confidence: float
    fallback: bool
    candidates: list[dict] = field(default_factory=list)
    latency_ms: float = 0.0
    margin: float = 0.0  # the best response's probability minus the runner-up's
    style: str = "balanced"
    buckets: list[dict] = field(default_factory=list)  # the likeliest buckets: [{"bucket", "probability"}]
    context: str | None = None  # the earlier turn(s) a follow-up was read with, if any
    chosen: str | None = None  # the stored response behind the answer (also when it fell back)
    searched: bool = False  # whether the table was searched for this answer
    similarity: float | None = None  # cosine similarity to the nearest stored message (None: not looked up)
    turn: str | None = None  # its id in the conversation log (None: not logged), for feedback

    def to_dict(self) -> dict:
        return asdict(self)


# A follow-up leans on earlier turns: it opens with a connective, or it is short and points back.
_FOLLOW_UP_START = re.compile(r"^(and|also|so|then|but|what about|how about|what if|ok(ay)?)\b", re.I)
_POINTS_BACK = re.compile(r"\b(it|that|this|those|these|them|they|there|same)\b", re.I)


def is_follow_up(message: str) -> bool:
    """Whether ``message`` leans on the turn before it ("and how long does that take?", "what about it?")."""
    text = message.strip()
    return bool(_FOLLOW_UP_START.match(text)) or (len(text.split()) <= 6 and bool(_POINTS_BACK.search(text)))


class ChatEngine:
    """Loads a head, its meta and its pinned table once; ``answer`` is then cheap and thread-safe.

    Example::

        engine = ChatEngine("head.safetensors", "meta.json")
        engine.answer("how do I reset my password?").response
        engine.answer("and how long does that take?", history=["how do I reset my password?"])
    """

    def __init__(self, weights: str, meta: str, options: ChatOptions | None = None):
        self.opts = options or ChatOptions()
        self.files = (str(weights), str(meta))
        self.turn_log = None  # set by chat and serve (retrieval/turn_log.py); eval logs nothing  # what another process loads to answer the same (serve --workers)
        # One query at a time per thread: a single thread avoids cross-core sync that costs more than it
        # saves. numpy's OpenBLAS too: its idle threads spin, so two answering threads (or processes)
        # with a BLAS pool each ran slower together than one alone (tests/bench/serve.py, BENCHMARKS.md).
        torch.set_num_threads(1)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, "blas")
        self.head, self.meta = checkpoint.load(weights, meta, device=self.opts.device)
        size = self.head.cfg.model_size
        if self.opts.model_size not in ("auto", size):
            raise ValueError(
                f"--model_size {self.opts.model_size} was asked for, but the checkpoint is a {size} head; pass --model_size auto or {size}"
            )
        cands = self.meta["candidates"]
        self.texts: list[str | None] = cands["texts"]  # None: the bucket's "other" slot
        self.cand_bucket = np.asarray(cands["buckets"], dtype=np.int64)
        self.candidates = Candidates.from_meta(cands)  # .index: response -> id; .other: bucket -> "other" slot id
        calibration = self.meta.get("calibration", {})
        self.min_confidence = float(
            calibration.get("min_confidence", 0.0) if self.opts.min_confidence is None else self.opts.min_confidence
        )
        self.min_margin = float(calibration.get("min_margin", 0.0) if self.opts.min_margin is None else self.opts.min_margin)
        self.min_similarity = float(
            calibration.get("min_similarity", 0.0) if self.opts.min_similarity is None else self.opts.min_similarity
        )
        # A head trained with --train_all brings its own fine-tuned encoder (None: the shipped one).
        self.encoder_path = self.meta.get("encoder_path")
        self.encoder_id = self.meta.get("encoder", TORCH_ID)  # metas without one predate the int8 encoder
        # The table's search index, saved beside its version and memory-mapped (retrieval/index_files.py):
        # opening it costs the same at 1M rows as at 1k, and needs no LanceDB.
        self.index, self.index_about = self._open_index()
        table_encoder = self.index_about.get("encoder")
        if self.index is not None and table_encoder != self.meta.get("encoder", table_encoder):
            # Vectors from another encoder would make every similarity meaningless: refuse, loudly.
            raise ValueError(
                f"the table's vectors come from encoder {table_encoder}, the model's from {self.meta.get('encoder')}; pass the --llm_db the model was trained with, or rebuild it"
            )
        # The neighbour vote (retrieval/neighbours.py) reads the model's own pinned table: rows of
        # another --llm_db do not speak for this head's candidates, so there the head answers alone.
        votes = self.meta.get("neighbours") or {}  # metas without it predate the vote
        self.neighbour_weight = float(votes.get("weight", 0.0)) if self.own_table and self.index is not None else 0.0
        self.neighbour_k, self.neighbour_temperature = (
            int(votes.get("k", NEIGHBOURS_K)),
            float(votes.get("temperature", NEIGHBOURS_TEMPERATURE)),
        )
        if self.index is not None:
            # Each stored row votes through the slot training gave it: its response's, else its
            # bucket's "other" slot. Mapped per distinct response, not per row (1M rows, ~1k responses).
            responses, codes = distinct(self.index.payload["assistant"])
            learned = np.array([self.candidates.index.get(r, -1) for r in responses], dtype=np.int64)[codes]
            other = np.array([self.candidates.other.get(b, -1) for b in range(self.index.num_buckets)], dtype=np.int64)
            self.row_slot = np.where(learned >= 0, learned, other[self.index.buckets])
            self._response_rows = (responses, codes)
        embed(
            ["warm-up"], device=self.opts.device, path=self.encoder_path, encoder_id=self.encoder_id
        )  # load the encoder now, not inside the first turn
        self.rng = np.random.default_rng(self.opts.seed)
        self._rng_lock = threading.Lock()  # numpy generators are not thread-safe; the server answers on threads

    def _open_index(self):
        """The search index of the table chat searches, and what it records (None, {} without a
        table); sets ``own_table``: it is the model's own table, at the version the model pinned."""
        self.own_table = False
        pinned = self.meta.get("table") or {}
        db = self.opts.llm_db or pinned.get("db")
        if not db:
            return None, {}
        # The pinned version when it is the model's own table; the latest version of any other --llm_db.
        same = self.opts.llm_db is None or (pinned.get("db") is not None and db_key(self.opts.llm_db) == db_key(pinned["db"]))
        self.own_table = same
        name = pinned.get("name", "conversations")
        try:
            version = pinned.get("version") if same else None
            if version is None:
                from retrieval.store import open_table

                version = open_table(db, name).version
            return open_index(db, name, int(version))
        except (ValueError, OSError) as exc:
            if self.opts.llm_db:
                raise ValueError(f"--llm_db {db!r} cannot be opened: {exc}") from exc
            return None, {}  # the model's own table is gone: answer from learned candidates alone

    def unsure(self, confidence: float, margin: float, best: str | None) -> bool:
        """The gates besides similarity: too little confidence, too small a lead, or a best response
        that is ``OUT_OF_SCOPE`` (a topic a reviewer marked out of scope, learned as a response of its
        own: conversations/records.py). Evaluation asks the same (retrieval/evaluate.py)."""
        return confidence < self.min_confidence or margin < self.min_margin or best == OUT_OF_SCOPE

    @property
    def searches_table(self) -> bool:
        """Search only where it can add answers: responses the head did not learn, or an explicit --llm_db."""
        return self.index is not None and (bool(self.opts.llm_db) or not self.meta.get("all_responses_learned", False))

    def _other_could_win(self, log_pr: np.ndarray, learned: dict, allowed: np.ndarray) -> bool:
        """Whether a retrieved row could beat the best learned candidate. From the model's own table,
        rows the head did not learn share their bucket's "other" slot, so each scores at most that
        slot's log probability: when no allowed slot beats the best learned score, searching cannot
        change the answer and is skipped (tests/bench/latency.py times the search on its own)."""
        pool = set(allowed.tolist())
        slots = [log_pr[j] for b, j in self.candidates.other.items() if b in pool]
        if not slots:
            return False
        best = max((s for s, _, _ in learned.values()), default=-math.inf)
        return bool(max(slots) > best)

    def _query(self, message: str, history: list[str] | None) -> tuple[str, str | None]:
        """The text to embed and search: a follow-up is read after the last ``history_turns`` user turns."""
        if history and self.opts.history_turns and is_follow_up(message):
            context = " ".join(history[-self.opts.history_turns :])
            return f"{context} {message}", context
        return message, None

    @torch.no_grad()
    def answer(
        self,
        message: str,
        history: list[str] | None = None,
        style_mode: str | None = None,
        seed: int | None = None,
        conversation: str | None = None,
        log: bool = True,
    ) -> Answer:
        """Answer ``message``; ``history``: the conversation's earlier user messages, oldest first.
        With a ``turn_log`` (retrieval/turn_log.py) the turn is recorded under ``conversation`` (a new
        id when None) unless ``log`` is False (the review's own questions); recording never waits
        for the disk."""
        ans = self._answer(message, history, style_mode, seed)
        if self.turn_log is not None and log:
            ans.turn = self.turn_log.record(message, ans, conversation or uuid.uuid4().hex)
        return ans

    def _answer(self, message: str, history: list[str] | None, style_mode: str | None, seed: int | None) -> Answer:
        start = time.perf_counter()
        message = clean_text(message, "the message", MAX_MESSAGE_CHARS)  # TextError (a ValueError) names what is wrong
        history = clean_turns(history or [])
        query, context = self._query(message, history)
        vec = embed([query], device=self.opts.device, path=self.encoder_path, encoder_id=self.encoder_id)[0]  # (384,)
        log_pb, log_pr = self.head.response_log_probs(torch.from_numpy(vec[None]).to(self.opts.device), self.head.lex([query]))
        log_pb, log_pr = log_pb[0].cpu().numpy(), log_pr[0].cpu().numpy()  # (K,), (C,)
        similarity = probe = None
        if self.neighbour_weight > 0:
            probe = self.index.probe(vec)  # the nearest cells, scanned once for the vote and the search
            cos, pos = self.index.nearest(vec, self.neighbour_k, probe)
            similarity = float(cos[0]) if len(cos) else None
            log_pr = mix(
                log_pr[None], vote(cos[None], self.row_slot[pos][None], len(log_pr), self.neighbour_temperature), self.neighbour_weight
            )[0]
        elif self.min_similarity > 0 and self.index is not None:
            probe = self.index.probe(vec)
            cos, _ = self.index.nearest(vec, 1, probe)
            similarity = float(cos[0]) if len(cos) else None
        order = np.argsort(-log_pb)
        allowed = order[: self.opts.top_labels] if self.opts.pool_mode == "top" else np.arange(len(log_pb))
        scores: dict[str, tuple[float, int, str]] = {}  # response -> (log score, bucket, where from)
        in_pool = np.isin(self.cand_bucket, allowed)
        for j in np.flatnonzero(in_pool):
            if self.texts[j] is not None:
                scores[self.texts[j]] = (float(log_pr[j]), int(self.cand_bucket[j]), "learned")
        searched = bool(
            self.searches_table
            and (self.opts.llm_db or self.opts.response_temperature > 0 or self._other_could_win(log_pr, scores, allowed))
        )
        if searched:
            pool = None if self.opts.pool_mode == "all" else allowed.tolist()
            rows = self.index.search(vec, query, self.opts.db_top_k, buckets=pool, probe=probe)
            # The head's own score is better calibrated than retrieval's for responses it learned.
            rows = [r for r in rows if r["assistant"] not in self.candidates.index]
            by_bucket: dict[int, list[dict]] = {}
            for r in rows:
                by_bucket.setdefault(int(r["bucket"]), []).append(r)
            for b, group in by_bucket.items():
                sims = np.array([r["cosine"] for r in group]) / RETRIEVAL_TEMPERATURE
                share = sims - np.logaddexp.reduce(sims)  # log softmax within this bucket's rows
                mass = log_pr[self.candidates.other[b]] if b in self.candidates.other else log_pb[b]
                # A response's share is the sum over its rows (the best row names the source): with
                # the max instead, a response asked 15 ways split its mass 15 ways and fell back.
                per_response: dict[str, tuple[float, str]] = {}
                for r, sh in zip(group, share):
                    total, best_id = per_response.get(r["assistant"], (-math.inf, f"table:{r['id']}"))
                    per_response[r["assistant"]] = (float(np.logaddexp(total, sh)), best_id)
                for response, (sh, source) in per_response.items():
                    score = float(mass + sh)
                    if score > scores.get(response, (-math.inf,))[0]:
                        scores[response] = (score, b, source)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1][0])
        top_buckets = [{"bucket": int(b), "probability": round(float(math.exp(log_pb[b])), 4)} for b in order[:3]]
        if not ranked:
            return Answer(
                self.opts.fallback_response,
                int(order[0]),
                0.0,
                True,
                [],
                (time.perf_counter() - start) * 1000,
                buckets=top_buckets,
                context=context,
                searched=searched,
                similarity=None if similarity is None else round(similarity, 4),
            )
        pick = 0
        if self.opts.response_temperature > 0:
            top = np.array([s for _, (s, _, _) in ranked[:20]]) / self.opts.response_temperature
            p = np.exp(top - np.logaddexp.reduce(top))
            if seed is not None:
                pick = int(np.random.default_rng(seed).choice(len(top), p=p))
            else:
                with self._rng_lock:
                    pick = int(self.rng.choice(len(top), p=p))
        response, (score, bucket, _) = ranked[pick]
        confidence = float(math.exp(score))
        # The gate looks at the best response, whatever sampling picked: is the model sure of this message?
        best = math.exp(ranked[0][1][0])
        margin = best - (math.exp(ranked[1][1][0]) if len(ranked) > 1 else 0.0)
        # Unlike every stored message: a question from outside the bot's world, however sure the head is.
        unfamiliar = similarity is not None and similarity < self.min_similarity
        fallback = unfamiliar or self.unsure(best, margin, ranked[0][0])
        if fallback:
            text, style = self.opts.fallback_response, "balanced"
        else:
            text, style = apply_style(
                response, style_mode or self.opts.style_mode, message, self.opts.creativity, self.opts.seed if seed is None else seed
            )
        return Answer(
            response=text,
            bucket=bucket,
            confidence=round(confidence, 4),
            fallback=fallback,
            candidates=[{"response": r, "score": round(s, 4), "bucket": b, "from": src} for r, (s, b, src) in ranked[:5]],
            latency_ms=round((time.perf_counter() - start) * 1000, 2),
            margin=round(margin, 4),
            style=style,
            buckets=top_buckets,
            context=context,
            chosen=response,
            searched=searched,
            similarity=None if similarity is None else round(similarity, 4),
        )

    def responses(self) -> list[str]:
        """Every stored response the engine can give: the learned ones, then the table's others."""
        table = list(self._response_rows[0]) if self.index is not None else []
        return list(dict.fromkeys([t for t in self.texts if t is not None] + table))

    def sources(self, response: str, limit: int = 3) -> list[dict]:
        """Stored records whose response is ``response`` (id, user message, source): what an answer rests on."""
        if self.index is None:
            return []
        responses, codes = self._response_rows
        if getattr(self, "_response_code", None) is None:
            self._response_code = {r: i for i, r in enumerate(responses)}
        code = self._response_code.get(response)
        if code is None:
            return []
        hits = np.flatnonzero(codes == code)
        hits = hits[np.argsort(self.index.rows[hits], kind="stable")][:limit]  # in the table's order
        cols = self.index.payload
        return [
            {"id": cols["id"][i], "user": cols["user"][i], "source": cols["source"][i], "bucket": int(self.index.buckets[i])}
            for i in hits.tolist()
        ]

    def explain(self, ans: Answer, limit: int = 3) -> dict:
        """The "why" behind an answer: likeliest buckets, the scored candidates with their source records,
        and the thresholds it was held to."""
        return {
            "buckets": ans.buckets,
            "candidates": [{**c, "records": self.sources(c["response"], limit)} for c in ans.candidates],
            "confidence": ans.confidence,
            "margin": ans.margin,
            "similarity": ans.similarity,
            "thresholds": {
                "min_confidence": round(self.min_confidence, 4),
                "min_margin": round(self.min_margin, 4),
                "min_similarity": round(self.min_similarity, 4),
            },
            "fallback": ans.fallback,
            "context": ans.context,
            "style": ans.style,
        }


class Conversation:
    """One user's conversation with an engine: keeps the user turns so follow-ups are read in context.

    Example::

        convo = Conversation(engine)
        convo.say("where is my parcel?")
        convo.say("and how long does that take?")   # read with the previous turn
        convo.reset()
    """

    def __init__(self, engine: ChatEngine, max_turns: int = 20):
        self.engine, self.max_turns = engine, max_turns
        self.history: list[str] = []
        self.last: Answer | None = None
        self.id = uuid.uuid4().hex  # the conversation log groups its turns by this

    def say(self, message: str) -> Answer:
        self.last = self.engine.answer(message, history=self.history, conversation=self.id)
        self.history = (self.history + [message])[-self.max_turns :]
        return self.last

    def reset(self) -> None:
        self.history, self.last, self.id = [], None, uuid.uuid4().hex
