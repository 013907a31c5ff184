"""Monitoring from the conversation log (retrieval/turn_log.py): per day, how many turns the bot
answered, how often it fell back, how often people said an answer was wrong, how sure it was, and
which model and table version served them. ``bucketchat report`` prints it; ``--mlflow`` logs it to
the serving model's training run (tasks/registry.py)."""

from __future__ import annotations

import numpy as np


def daily(turns) -> list[dict]:
    """One row per UTC day of ``turns`` (the table ``read_turns`` returns), oldest first."""
    rows = turns.to_pylist()
    days: dict[str, list[dict]] = {}
    for t in rows:
        days.setdefault(t["time"].date().isoformat(), []).append(t)
    out = []
    for day, ts in sorted(days.items()):
        conf = np.array([t["confidence"] for t in ts if t["confidence"] is not None], dtype=float)
        rated = [t["feedback"] for t in ts if t["feedback"] is not None]
        served = sorted({f"{t['model']} (table v{t['table_version']})" for t in ts})
        out.append(
            {
                "day": day,
                "turns": len(ts),
                "conversations": len({t["conversation"] for t in ts}),
                "fallback_rate": sum(bool(t["fallback"]) for t in ts) / len(ts),
                "rated": len(rated),
                "thumbs_down_rate": rated.count("bad") / len(rated) if rated else None,
                "confidence_p10": float(np.percentile(conf, 10)) if len(conf) else None,
                "confidence_p50": float(np.percentile(conf, 50)) if len(conf) else None,
                "latency_p50_ms": float(np.percentile([t["latency_ms"] for t in ts], 50)),
                "served_by": served,
            }
        )
    return out


def format_daily(days: list[dict]) -> str:
    if not days:
        return "no turns logged yet: chat and serve record them (unless --no_log)"

    def pct(v):
        return "—" if v is None else f"{v:.1%}"

    lines = [
        f"{'day':<10} {'turns':>6} {'convs':>6} {'fallback':>8} {'rated':>5} {'thumbs down':>11} {'conf p10/p50':>12} {'p50 ms':>7}  served by"
    ]
    for d in days:
        conf = "—" if d["confidence_p50"] is None else f"{d['confidence_p10']:.2f}/{d['confidence_p50']:.2f}"
        lines.append(
            f"{d['day']:<10} {d['turns']:>6} {d['conversations']:>6} {pct(d['fallback_rate']):>8} {d['rated']:>5} "
            f"{pct(d['thumbs_down_rate']):>11} {conf:>12} {d['latency_p50_ms']:>7.1f}  {', '.join(d['served_by'])}"
        )
    return "\n".join(lines)
