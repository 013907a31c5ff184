"""Reading conversation JSONL into (user, assistant) pairs; every bad line is kept with its reason.

Two record shapes (one JSON object per line, UTF-8):

- flat: ``{"user": "...", "assistant": "...", ...}``
- multi-turn: ``{"messages": [{"role": "user", "content": "..."}, ...], ...}`` — one pair per
  assistant turn, the earlier turns kept as ``context``; ``system`` turns are allowed and skipped.

Extra fields are kept as metadata; ``intent``/``label``/``bucket`` (first present) becomes ``label``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversations.text import MAX_LINE_BYTES, TextError, clean_text, decode_line, read_lines

LABEL_FIELDS = ("intent", "label", "bucket")
ROLES = ("user", "assistant", "system")
# Fields the loader itself interprets; everything else is metadata.
RESERVED = {"user", "assistant", "messages", "context", "source", "parent_id", "op", "id", *LABEL_FIELDS}


@dataclass(frozen=True)
class Pair:
    """One training example: a user message, the stored response, and where it came from."""

    user: str
    assistant: str
    context: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns, oldest first
    label: str | None = None
    source: str = ""
    line: int = 0
    turn: int = 0
    parent_id: str | None = None
    op: str = "original"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        # A derived pair's ``line`` is its position in the dataset that made it, so ids stay unique.
        return f"{self.source}:{self.line}:{self.turn}" if self.op == "original" else f"{self.parent_id}~{self.op}@{self.line}"

    def to_record(self) -> dict[str, Any]:
        """The flat JSONL form; ``load_records`` reads it back unchanged."""
        rec: dict[str, Any] = {"user": self.user, "assistant": self.assistant}
        if self.context:
            rec["context"] = [{"role": r, "content": c} for r, c in self.context]
        if self.label is not None:
            rec["label"] = self.label
        rec.update({"source": self.source, "op": self.op})
        if self.parent_id:
            rec["parent_id"] = self.parent_id
        rec.update(self.meta)
        return rec


@dataclass(frozen=True)
class Reject:
    """A line that could not be used, with what is wrong and how to fix it."""

    path: str
    line: int
    reason: str
    fix: str
    raw: str

    def message(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}. Fix: {self.fix}"

    def to_record(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "reason": self.reason, "fix": self.fix, "raw": self.raw}


class RecordError(ValueError):
    """Raised in ``--strict`` mode for the first bad line."""


class _Bad(Exception):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"field '{where}' must be a string, got {type(value).__name__}", f"write '{where}' as a JSON string")
    try:
        return clean_text(value, f"field '{where}'")
    except TextError as exc:
        raise _Bad(exc.reason, exc.fix + " or drop the line") from None


def _label(obj: dict[str, Any]) -> str | None:
    for key in LABEL_FIELDS:
        if key in obj and obj[key] is not None:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise _Bad(f"field '{key}' must be a string or integer, got {type(value).__name__}", f"write '{key}' as a string")
            return str(value)
    return None


def _turns(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise _Bad(f"field '{where}' must be a list of {{role, content}} objects", f"write '{where}' as a JSON list")
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _Bad(f"{where}[{i}] must be an object, got {type(msg).__name__}", 'write each turn as {"role": ..., "content": ...}')
        role = msg.get("role")
        if role not in ROLES:
            raise _Bad(f"{where}[{i}].role is {role!r}, not one of {', '.join(ROLES)}", "use role 'user', 'assistant' or 'system'")
        turns.append((role, _text(msg.get("content"), f"{where}[{i}].content")))
    return turns


def parse_record(obj: Any, source: str, line: int) -> list[Pair]:
    """Turn one decoded JSON value into pairs, or raise ``_Bad`` saying why it cannot be used."""
    if not isinstance(obj, dict):
        raise _Bad(f"line is a JSON {type(obj).__name__}, not an object", "write one JSON object per line")
    label = _label(obj)
    meta = {k: v for k, v in obj.items() if k not in RESERVED}
    src = obj.get("source") if isinstance(obj.get("source"), str) and obj.get("source") else source
    op = obj.get("op") if isinstance(obj.get("op"), str) and obj.get("op") else "original"
    parent = obj.get("parent_id") if isinstance(obj.get("parent_id"), str) else None
    common = dict(label=label, source=src, line=line, parent_id=parent, op=op, meta=meta)
    if "messages" in obj:
        turns = _turns(obj["messages"], "messages")
        pairs, history = [], []
        for role, content in turns:
            if role == "assistant" and history and history[-1][0] == "user":
                ctx = tuple(t for t in history[:-1] if t[0] != "system")
                pairs.append(Pair(user=history[-1][1], assistant=content, context=ctx, turn=len(pairs), **common))
            history.append((role, content))
        if not pairs:
            raise _Bad("'messages' has no assistant turn that follows a user turn", "add a user turn and the assistant's reply to it")
        return pairs
    missing = [k for k in ("user", "assistant") if k not in obj]
    if missing:
        raise _Bad(f"missing field {', '.join(repr(m) for m in missing)}", 'give both "user" and "assistant", or a "messages" list')
    user, assistant = _text(obj["user"], "user"), _text(obj["assistant"], "assistant")
    context = tuple(_turns(obj["context"], "context")) if obj.get("context") else ()
    return [Pair(user=user, assistant=assistant, context=context, **common)]


def check_input(path: str | Path, flag: str = "--data") -> Path:
    """``path`` as a readable file, or a ``ValueError`` that names the path, what is wrong and the fix.

    A missing file, a folder and an unreadable file are errors, never "no records": the fix differs.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r} is a folder, not a file; pass a JSONL file (for a folder of drops use `bucketchat retrain --data_dir {path}`)"
        )
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is not a regular file; pass a JSONL file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ValueError(f"{flag} {str(path)!r} cannot be read (permission denied); make it readable (`chmod u+r {path}`)") from None
    return path


def _surrogate_field(value: Any, where: str = "") -> str | None:
    """Where a decoded JSON value holds a lone surrogate (only a ``\\u`` escape makes one), e.g.
    ``messages[0].content``; "" for the value itself; None when it holds none."""
    if isinstance(value, str):
        return where if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{where}.{key}".lstrip(".") if isinstance(key, str) else f"{where}[{key}]"
        if isinstance(key, str) and _surrogate_field(key) is not None:
            return f"a key of {where or 'the record'}"
        found = _surrogate_field(item, sub)
        if found is not None:
            return found
    return None


def iter_records(path: str | Path, strict: bool = False, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Pair | Reject]:
    """Yield every pair in a JSONL file, and a ``Reject`` for every line that cannot be used: each
    non-blank line gives one or more pairs or exactly one reject.

    Reads bytes so one line of invalid UTF-8 is reported rather than aborting the whole file; text
    is checked and repaired by ``conversations.text`` (the one rule for every way text comes in).
    """
    path = check_input(path)
    with open(path, "rb") as fh:
        for number, (raw, size) in enumerate(read_lines(fh, max_line_bytes), start=1):
            bad = _read_line(raw, size, max_line_bytes, str(path), number)
            if isinstance(bad, list):
                yield from bad
                continue
            if bad is None:
                continue  # blank lines are layout, not records
            if strict:
                raise RecordError(bad.message())
            yield bad


def _read_line(raw: bytes, size: int, limit: int, path: str, number: int) -> list[Pair] | Reject | None:
    """The pairs of one line, its ``Reject``, or None for a blank line."""
    if size > limit:
        return Reject(
            path,
            number,
            f"line is {size:,} bytes, over the {limit:,}-byte limit",
            "split the conversation or drop the line",
            raw.decode("utf-8", "replace") + "…",
        )
    try:
        text = decode_line(raw)
    except TextError as exc:
        return Reject(path, number, exc.reason, exc.fix, raw.decode("utf-8", "replace").rstrip("\r\n"))
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Reject(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})", "write one complete JSON object per line", text)
    except RecursionError:
        return Reject(path, number, "JSON nested too deeply", "flatten the record", text[:200])
    try:
        where = _surrogate_field(obj) if "\\u" in text else None
    except RecursionError:
        return Reject(path, number, "JSON nested too deeply", "flatten the record", text[:200])
    if where is not None:
        return Reject(
            path,
            number,
            f"{f'field {where!r}' if where else 'the line'} holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair)",
            "write the character itself in UTF-8, or escape it as a full surrogate pair",
            text,
        )
    try:
        return parse_record(obj, Path(path).stem, number)
    except _Bad as exc:
        return Reject(path, number, exc.reason, exc.fix, text)


def require_pairs(path: str | Path, flag: str = "--data") -> None:
    """``ValueError`` unless ``path`` holds at least one usable pair; reads only up to the first one,
    so a good file costs a line and a useless one is reported before any work starts."""
    rejects: list[Reject] = []
    for item in iter_records(path):
        if isinstance(item, Pair):
            return
        rejects.append(item)
    if not rejects:
        raise ValueError(f'{flag} {str(path)!r} is empty; it needs one JSON object per line, e.g. {{"user": "hi", "assistant": "hello"}}')
    first = rejects[0]
    raise ValueError(
        f"{flag} {str(path)!r} holds no usable conversation: all {len(rejects):,} of its non-blank lines were rejected, the first at line {first.line}: {first.reason}. Fix: {first.fix}"
    )


def load_records(path: str | Path, strict: bool = False) -> tuple[list[Pair], list[Reject]]:
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    for item in iter_records(path, strict=strict):
        (pairs if isinstance(item, Pair) else rejects).append(item)
    return pairs, rejects
