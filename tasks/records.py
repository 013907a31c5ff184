"""Reading conversation JSONL into (user, assistant) pairs; every bad line is kept with its reason.

Two record shapes (one JSON object per line, UTF-8):

- flat: ``{"user": "...", "assistant": "...", ...}``
- multi-turn: ``{"messages": [{"role": "user", "content": "..."}, ...], ...}`` — one pair per
  assistant turn, the earlier turns kept as ``context``; ``system`` turns are allowed and skipped.

Extra fields are kept as metadata; ``intent``/``label``/``bucket`` (first present) becomes ``label``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

LABEL_FIELDS = ("intent", "label", "bucket")
# A line longer than this is rejected unread: no real conversation is this long, and reading it
# whole would let one bad line take the process's memory.
MAX_LINE_BYTES = 1 << 20
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
    if not value.strip():
        raise _Bad(f"field '{where}' is empty", f"give '{where}' some text or drop the line")
    return value.strip()


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


def _lines(fh, limit: int) -> Iterator[tuple[bytes, int]]:
    """(line, its full length) for each line; a line over ``limit`` bytes comes back cut to its first
    200 bytes, and the rest of it is skipped in bounded chunks rather than read into memory."""
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size, chunk = len(raw), raw
        while chunk and not chunk.endswith(b"\n"):
            chunk = fh.readline(1 << 16)
            size += len(chunk)
        yield raw[:200], size


def iter_records(path: str | Path, strict: bool = False, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Pair | Reject]:
    """Yield every pair in a JSONL file, and a ``Reject`` for every line that cannot be used: each
    non-blank line gives one or more pairs or exactly one reject.

    Reads bytes so one line of invalid UTF-8 is reported rather than aborting the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data/--input file {str(path)!r} does not exist; pass the path of a JSONL file")
    source = path.stem
    with open(path, "rb") as fh:
        for number, (raw, size) in enumerate(_lines(fh, max_line_bytes), start=1):
            if size > max_line_bytes:
                bad = Reject(str(path), number, f"line is {size:,} bytes, over the {max_line_bytes:,}-byte limit", "split the conversation or drop the line", raw.decode("utf-8", "replace") + "…")
                if strict:
                    raise RecordError(bad.message())
                yield bad
                continue
            if not raw.strip():
                continue  # blank lines are layout, not records
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = Reject(str(path), number, f"invalid UTF-8 at byte {exc.start}", "save the file as UTF-8", raw.decode("utf-8", "replace").rstrip("\n"))
            else:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    bad = Reject(str(path), number, f"invalid JSON ({exc.msg} at column {exc.colno})", "write one complete JSON object per line", text.rstrip("\n"))
                except RecursionError:
                    bad = Reject(str(path), number, "JSON nested too deeply", "flatten the record", text[:200])
                else:
                    try:
                        yield from parse_record(obj, source, number)
                        continue
                    except _Bad as exc:
                        bad = Reject(str(path), number, exc.reason, exc.fix, text.rstrip("\n"))
            if strict:
                raise RecordError(bad.message())
            yield bad


def load_records(path: str | Path, strict: bool = False) -> tuple[list[Pair], list[Reject]]:
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    for item in iter_records(path, strict=strict):
        (pairs if isinstance(item, Pair) else rejects).append(item)
    return pairs, rejects
