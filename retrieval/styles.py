"""Answer styles (DESIGN.md §4): applied last, to the response already chosen, never swapping it.

    balanced   the stored response, verbatim
    concise    its first sentence (two when the first is a short lead-in such as "Sure.")
    analyst    the same text laid out: the first sentence as the short answer, the rest as numbered points
    creative   a conversational opener and/or closer around the verbatim text; --creativity (0-1) is
               the chance of each, drawn deterministically from the seed and the response
    auto       picks one of the above from cues in the user's message

Every transform keeps the stored words (concise keeps a prefix of them), so an audit can always map
an answer back to its curated response.
"""

from __future__ import annotations

import random
import re

STYLES = ("auto", "balanced", "concise", "analyst", "creative")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Cues for ``auto``, checked in this order; the first family that matches wins.
_CUES = (
    ("concise", re.compile(r"\b(tl;?dr|briefly|brief|quick(ly)?|short answer|in short|one line|in a word|summar(y|ise|ize))\b", re.I)),
    ("analyst", re.compile(r"\b(explain|in detail|details?|step[- ]by[- ]step|steps|compare|difference|pros and cons|why)\b", re.I)),
    ("creative", re.compile(r"\b(fun|funny|joke|creative|playful|cheer me up)\b|!{2,}|:\)|😀|😊", re.I)),
)
OPENERS = ("Good question!", "Happy to help.", "Sure thing!", "Glad you asked.", "Here's the deal:", "Great question.")
CLOSERS = ("Hope that helps!", "Anything else I can help with?", "Good luck!", "Let me know how it goes.")


def sentences(text: str) -> list[str]:
    """Split on sentence ends followed by a capital, digit or quote ("e.g. this" stays whole)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip())]
    return [p for p in parts if p]


def choose_style(message: str) -> str:
    """The style ``auto`` resolves to for ``message``: the first cue family found, else balanced."""
    for style, pattern in _CUES:
        if pattern.search(message or ""):
            return style
    return "balanced"


def apply_style(response: str, style: str, message: str = "", creativity: float = 0.35, seed: int = 0) -> tuple[str, str]:
    """(styled text, the style actually applied). Deterministic for (style, response, creativity, seed)."""
    if style not in STYLES:
        raise ValueError(f"--style_mode {style!r} is not available; choose one of {', '.join(STYLES)}")
    if not 0.0 <= creativity <= 1.0:
        raise ValueError(f"--creativity must be in [0, 1], got {creativity}")
    if style == "auto":
        style = choose_style(message)
    if style == "concise":
        parts = sentences(response)
        if len(parts) <= 1:
            return response, style
        keep = parts[:2] if len(parts[0].split()) <= 3 else parts[:1]
        return " ".join(keep), style
    if style == "analyst":
        parts = sentences(response)
        if len(parts) <= 1:
            return f"Short answer: {response}", style
        points = "\n".join(f"{i}. {p}" for i, p in enumerate(parts[1:], start=1))
        return f"Short answer: {parts[0]}\nDetails:\n{points}", style
    if style == "creative":
        # Seeded by the response too, so the same answer is dressed the same way whatever came before.
        rng = random.Random(f"{seed}\0{response}")
        opener = rng.choice(OPENERS) if rng.random() < creativity else None
        closer = rng.choice(CLOSERS) if rng.random() < creativity else None
        return " ".join(p for p in (opener, response, closer) if p), style
    return response, "balanced"
