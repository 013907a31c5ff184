"""``bucketchat eval``: a model scored through the same engine ``chat`` uses.

Response accuracy counts the returned text against the test line's ``assistant`` (a fallback is
wrong); ranking accuracy ignores the fallback (was the best candidate right?); bucket accuracy
compares the answer's bucket with the bucket the model files the expected response under;
out-of-scope recall is the share of ``--oos`` messages that get the fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conversations.text import MAX_LINE_BYTES, MAX_MESSAGE_CHARS, TextError, clean_text, decode_line, read_lines
from models import progress
from retrieval.answer import ChatEngine


def read_messages(path: str | Path) -> list[str]:
    """Out-of-scope messages: a conversation JSONL (its user side) or plain text, one per line.
    Text follows the one rule of ``conversations.text``; a line it rejects is an error naming the line."""
    from conversations.records import check_input

    path = check_input(path, "--oos")
    out = []
    with open(path, "rb") as fh:
        for number, (raw, size) in enumerate(read_lines(fh, MAX_LINE_BYTES), start=1):
            try:
                if size > MAX_LINE_BYTES:
                    raise TextError("too_long", f"the line is {size:,} bytes", "split it")
                line = decode_line(raw).strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg}); write one object per line, or plain text") from None
                    line = obj.get("user") if isinstance(obj, dict) else None
                    if not isinstance(line, str) or not line.strip():
                        raise ValueError(f'{path}:{number}: no "user" text; give {{"user": "..."}} or a plain line')
                out.append(clean_text(line, "the message", MAX_MESSAGE_CHARS))
            except TextError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 90, 99)} | {"mean": round(float(arr.mean()), 2)}


def evaluate(engine: ChatEngine, data: str | Path, oos: str | Path | None = None, columns=None) -> dict:
    """Every test pair (and out-of-scope message) through ``engine.answer``; returns the report.
    ``columns`` (``conversations.records.Columns``) names the columns of a table ``data``."""
    from conversations.records import load_records

    pairs, rejects = load_records(data, columns=columns)
    if not pairs:
        raise ValueError(
            f"--data {str(data)!r} holds no usable test pairs ({len(rejects)} malformed lines); each line needs user and assistant"
        )
    bucket_of = {t: int(b) for t, b in zip(engine.texts, engine.cand_bucket) if t is not None}
    right = ranked_right = fell_back = bucket_right = bucket_n = 0
    latencies, in_scope = [], []  # (answered right but for the similarity gate, its similarity)
    for pair in progress.bar(len(pairs), "evaluating", "message", iterable=pairs):
        ans = engine.answer(pair.user)
        latencies.append(ans.latency_ms)
        right += ans.response == pair.assistant and not ans.fallback
        ranked_right += ans.chosen == pair.assistant
        fell_back += ans.fallback
        in_scope.append((ans.chosen == pair.assistant and not _other_gates(engine, ans), ans.similarity))
        if pair.assistant in bucket_of:
            bucket_n += 1
            bucket_right += ans.bucket == bucket_of[pair.assistant]
    n = len(pairs)
    report = {
        "data": str(data),
        "messages": n,
        "malformed_lines": len(rejects),
        "response_accuracy": right / n,
        "ranking_accuracy": ranked_right / n,
        "bucket_accuracy": bucket_right / bucket_n if bucket_n else None,
        "fallback_rate": fell_back / n,
        "unknown_responses": n - bucket_n,  # expected responses the model never learned (retrieval only)
        "thresholds": {"min_confidence": engine.min_confidence, "min_margin": engine.min_margin, "min_similarity": engine.min_similarity},
    }
    if oos:
        messages = read_messages(oos)
        answers = [engine.answer(m) for m in progress.bar(len(messages), "off-topic", "message", iterable=messages)]
        latencies += [a.latency_ms for a in answers]
        report["oos"] = {
            "data": str(oos),
            "messages": len(messages),
            "recall": sum(a.fallback for a in answers) / len(messages) if messages else None,
            "tradeoff": tradeoff(in_scope, [(_other_gates(engine, a), a.similarity) for a in answers], engine.min_similarity),
        }
    report["latency_ms"] = _percentiles(latencies)
    return report


def _other_gates(engine: ChatEngine, ans) -> bool:
    """Whether a gate other than similarity gives ``ans`` the fallback."""
    return engine.unsure(ans.confidence, ans.margin, ans.chosen)


def tradeoff(
    in_scope: list[tuple[bool, float | None]], oos: list[tuple[bool, float | None]], current: float, points: int = 11
) -> list[dict]:
    """In-scope accuracy and out-of-scope recall had ``--min_similarity`` been t, for t over the
    similarities seen (and the current one): the curve a user picks a threshold from. ``in_scope``:
    (right with the other gates, similarity); ``oos``: (another gate falls back, similarity)."""
    sims = sorted({s for _, s in in_scope + oos if s is not None})
    if not sims or not in_scope or not oos:
        return []
    grid = sorted({round(float(t), 4) for t in np.quantile(sims, np.linspace(0, 1, points))} | {round(current, 4), 0.0})

    def below(s, t):
        return s is not None and s < t

    return [
        {
            "min_similarity": t,
            "in_scope_accuracy": sum(ok and not below(s, t) for ok, s in in_scope) / len(in_scope),
            "oos_recall": sum(gated or below(s, t) for gated, s in oos) / len(oos),
        }
        for t in grid
    ]


def format_report(r: dict) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2%}"

    lines = [
        f"test data            {r['data']} ({r['messages']} messages"
        + (f", {r['malformed_lines']} malformed lines skipped" if r["malformed_lines"] else "")
        + ")",
        f"response accuracy    {pct(r['response_accuracy'])}   (fallbacks count as wrong)",
        f"ranking accuracy     {pct(r['ranking_accuracy'])}   (best candidate, fallback ignored)",
        f"bucket accuracy      {pct(r['bucket_accuracy'])}",
        f"fallback rate        {pct(r['fallback_rate'])}   (thresholds: confidence {r['thresholds']['min_confidence']:.4f}, margin {r['thresholds']['min_margin']:.4f}, similarity {r['thresholds']['min_similarity']:.4f})",
    ]
    if r["unknown_responses"]:
        lines.append(f"not learned          {r['unknown_responses']} expected responses are not among the model's candidates")
    if "oos" in r:
        lines.append(
            f"out-of-scope recall  {pct(r['oos']['recall'])}   ({r['oos']['messages']} messages from {r['oos']['data']} that should fall back)"
        )
        if r["oos"]["tradeoff"]:
            lines.append("trade-off            --min_similarity  in-scope accuracy  out-of-scope recall")
            for p in r["oos"]["tradeoff"]:
                mark = "  <- now" if abs(p["min_similarity"] - round(r["thresholds"]["min_similarity"], 4)) < 1e-9 else ""
                lines.append(
                    f"                     {p['min_similarity']:>16.4f}  {pct(p['in_scope_accuracy']):>17}  {pct(p['oos_recall']):>19}{mark}"
                )
    lat = r["latency_ms"]
    lines.append(f"latency per turn     p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, mean {lat['mean']} ms")
    return "\n".join(lines)
