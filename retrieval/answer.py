"""Answering a message with a stored response (DESIGN.md §4).

p(bucket) and p(response) come from the head over the message embedding; the learned candidates are
scored in memory. The pinned table adds responses the head did not learn (hybrid FTS + vector search):
those of a bucket share the probability of that bucket's "other" slot, split by similarity among the
retrieved rows of that bucket (rows of a foreign ``--llm_db`` share their bucket's probability). The best-scoring
response wins (or one is sampled with ``response_temperature`` > 0); too little confidence gives the
fallback answer instead of a wrong one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models import checkpoint
from retrieval.encoder import embed
from retrieval.store import hybrid_search, open_table, table_encoder

FALLBACK_RESPONSE = "I'm not sure I can answer that. Could you rephrase it, or ask about something I was trained on?"
# Softmax temperature turning cosine similarities of retrieved rows into a distribution.
RETRIEVAL_TEMPERATURE = 0.05


@dataclass
class ChatOptions:
    device: str = "cpu"
    pool_mode: str = "all"
    top_labels: int = 3
    response_temperature: float = 0.0
    llm_db: str | None = None
    db_top_k: int = 20
    min_confidence: float | None = None  # None: the calibrated value in the meta
    seed: int = 0
    fallback_response: str = FALLBACK_RESPONSE

    def __post_init__(self):
        if self.pool_mode not in ("all", "top"):
            raise ValueError(f"--pool_mode must be 'all' or 'top', got {self.pool_mode!r}")
        if self.top_labels < 1:
            raise ValueError(f"--top_labels must be at least 1, got {self.top_labels}")
        if self.response_temperature < 0:
            raise ValueError(f"--response_temperature must be >= 0 (0 = always the best response), got {self.response_temperature}")
        if self.db_top_k < 1:
            raise ValueError(f"--db_top_k must be at least 1, got {self.db_top_k}")


@dataclass
class Answer:
    response: str
    bucket: int
    confidence: float
    fallback: bool
    candidates: list[dict] = field(default_factory=list)
    latency_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class ChatEngine:
    """Loads a head, its meta and its pinned table once; ``answer`` is then cheap.

    Example::

        engine = ChatEngine("head.safetensors", "meta.json")
        engine.answer("how do I reset my password?").response
    """

    def __init__(self, weights: str, meta: str, options: ChatOptions | None = None):
        self.opts = options or ChatOptions()
        # One query at a time: a single thread avoids cross-core sync that costs more than it saves.
        torch.set_num_threads(1)
        self.head, self.meta = checkpoint.load(weights, meta, device=self.opts.device)
        cands = self.meta["candidates"]
        self.texts: list[str | None] = cands["texts"]  # None: the bucket's "other" slot
        self.cand_bucket = np.asarray(cands["buckets"], dtype=np.int64)
        self.known = {t: i for i, t in enumerate(self.texts) if t is not None}
        self.other_slot = {int(b): j for j, (t, b) in enumerate(zip(self.texts, self.cand_bucket)) if t is None}
        threshold = self.opts.min_confidence
        self.min_confidence = float(self.meta["calibration"]["min_confidence"] if threshold is None else threshold)
        # A head trained with --train_all brings its own fine-tuned encoder (None: the shipped one).
        self.encoder_path = self.meta.get("encoder_path")
        self.table = self._open_table()
        if self.table is not None and table_encoder(self.table) != self.meta.get("encoder", table_encoder(self.table)):
            # Vectors from another encoder would make every similarity meaningless: refuse, loudly.
            raise ValueError(f"the table's vectors come from encoder {table_encoder(self.table)}, the model's from {self.meta.get('encoder')}; pass the --llm_db the model was trained with, or rebuild it")
        embed(["warm-up"], device=self.opts.device, path=self.encoder_path)  # load the encoder now, not inside the first turn
        self.rng = np.random.default_rng(self.opts.seed)

    def _open_table(self):
        pinned = self.meta.get("table") or {}
        db = self.opts.llm_db or pinned.get("db")
        if not db:
            return None
        # The pinned version when it is the model's own table; the latest version of any other --llm_db.
        from pathlib import Path

        same = self.opts.llm_db is None or (pinned.get("db") is not None and Path(self.opts.llm_db).resolve() == Path(pinned["db"]).resolve())
        try:
            return open_table(db, pinned.get("name", "conversations"), pinned.get("version") if same else None)
        except (ValueError, OSError) as exc:
            if self.opts.llm_db:
                raise ValueError(f"--llm_db {db!r} cannot be opened: {exc}") from exc
            return None  # the model's own table is gone: answer from learned candidates alone

    @property
    def searches_table(self) -> bool:
        """Search only where it can add answers: responses the head did not learn, or an explicit --llm_db."""
        return self.table is not None and (bool(self.opts.llm_db) or not self.meta.get("all_responses_learned", False))

    @torch.no_grad()
    def answer(self, message: str) -> Answer:
        start = time.perf_counter()
        if not message.strip():
            raise ValueError("the message is empty; type a question")
        vec = embed([message], device=self.opts.device, path=self.encoder_path)[0]  # (384,)
        log_pb, log_pr = self.head.response_log_probs(torch.from_numpy(vec[None]).to(self.opts.device), self.head.lex([message]))
        log_pb, log_pr = log_pb[0].cpu().numpy(), log_pr[0].cpu().numpy()  # (K,), (C,)
        allowed = np.argsort(-log_pb)[: self.opts.top_labels] if self.opts.pool_mode == "top" else np.arange(len(log_pb))
        scores: dict[str, tuple[float, int, str]] = {}  # response -> (log score, bucket, where from)
        in_pool = np.isin(self.cand_bucket, allowed)
        for j in np.flatnonzero(in_pool):
            if self.texts[j] is not None:
                scores[self.texts[j]] = (float(log_pr[j]), int(self.cand_bucket[j]), "learned")
        if self.searches_table:
            rows = hybrid_search(self.table, vec, message, self.opts.db_top_k, buckets=None if self.opts.pool_mode == "all" else allowed.tolist())
            # The head's own score is better calibrated than retrieval's for responses it learned.
            rows = [r for r in rows if r["assistant"] not in self.known]
            by_bucket: dict[int, list[dict]] = {}
            for r in rows:
                by_bucket.setdefault(int(r["bucket"]), []).append(r)
            for b, group in by_bucket.items():
                sims = np.array([r["cosine"] for r in group]) / RETRIEVAL_TEMPERATURE
                share = sims - np.logaddexp.reduce(sims)  # log softmax within this bucket's rows
                mass = log_pr[self.other_slot[b]] if b in self.other_slot else log_pb[b]
                for r, sh in zip(group, share):
                    score = float(mass + sh)
                    if score > scores.get(r["assistant"], (-math.inf,))[0]:
                        scores[r["assistant"]] = (score, b, f"table:{r['id']}")
        ranked = sorted(scores.items(), key=lambda kv: -kv[1][0])
        if not ranked:
            return Answer(self.opts.fallback_response, int(np.argmax(log_pb)), 0.0, True, [], (time.perf_counter() - start) * 1000)
        pick = 0
        if self.opts.response_temperature > 0:
            top = np.array([s for _, (s, _, _) in ranked[:20]]) / self.opts.response_temperature
            pick = int(self.rng.choice(len(top), p=np.exp(top - np.logaddexp.reduce(top))))
        response, (score, bucket, _) = ranked[pick]
        confidence = float(math.exp(score))
        fallback = confidence < self.min_confidence
        candidates = [{"response": r, "score": round(s, 4), "bucket": b, "from": src} for r, (s, b, src) in ranked[:5]]
        return Answer(
            response=self.opts.fallback_response if fallback else response,
            bucket=bucket,
            confidence=round(confidence, 4),
            fallback=fallback,
            candidates=candidates,
            latency_ms=round((time.perf_counter() - start) * 1000, 2),
        )
