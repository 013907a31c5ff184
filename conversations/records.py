"""Reading conversations into (user, assistant) pairs; every bad record is kept with its reason.

Files, by suffix: ``.jsonl`` (one JSON object per line, UTF-8; any other suffix reads as JSONL),
``.json`` (one array of such objects), and tables: ``.csv``/``.tsv`` and ``.parquet``, one row per
pair, whose columns ``Columns`` names. Record shapes:

- flat: ``{"user": "...", "assistant": "...", ...}``
- out of scope: ``{"user": "...", "out_of_scope": true}``, a message the bot should fall back on;
- multi-turn: ``{"messages": [{"role": "user", "content": "..."}, ...], ...}`` — one pair per
  assistant turn, the earlier turns kept as ``context``; ``system`` turns are allowed and skipped.

Extra fields (and extra columns) are kept as metadata; ``intent``/``label``/``bucket`` (first
present) becomes ``label``. Every format goes through the same checks and rejects; a reject's
``line`` is the file line for JSONL and CSV, the element number for a JSON array and the row number
for Parquet (1 = the first).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversations.text import MAX_LINE_BYTES, TextError, clean_text, decode_line, read_lines

LABEL_FIELDS = ("intent", "label", "bucket")
ROLES = ("user", "assistant", "system")
# Fields the loader itself interprets; everything else is metadata.
RESERVED = {"user", "assistant", "messages", "context", "source", "parent_id", "op", "id", "out_of_scope", *LABEL_FIELDS}
# The stored "response" of a message the bot should not answer: ``{"user": ..., "out_of_scope": true}``
# (what `bucketchat review` writes for a group marked out of scope). The head learns it like any
# response, so paraphrases of that topic are caught too; chat then gives its fallback answer.
OUT_OF_SCOPE = "[out of scope]"


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
        rec: dict[str, Any] = {
            "user": self.user,
            **({"out_of_scope": True} if self.assistant == OUT_OF_SCOPE else {"assistant": self.assistant}),
        }
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


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
INPUT_SUFFIXES = (".jsonl", ".json", *TABLE_SUFFIXES)


@dataclass(frozen=True)
class Columns:
    """Which columns of a table hold the user's message, the stored response and the label
    (``--user_col``, ``--assistant_col``, ``--label_col``). ``label`` None: the first of
    intent/label/bucket the table has, if any. Other columns are kept as metadata."""

    user: str = "user"
    assistant: str = "assistant"
    label: str | None = None

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """A table row as a flat record (the JSONL shape); an empty cell is a missing field."""
        named = {self.user: "user", self.assistant: "assistant"}
        if self.label:
            named[self.label] = "label"
        # A column named like a field the loader interprets (context, source, id…) is the user's
        # data, not ours to interpret: kept as metadata under another name.
        rec = {(f"col_{k}" if k in RESERVED else k): v for k, v in row.items() if k not in named and v not in (None, "")}
        rec = {k: v for k, v in rec.items() if not (k.startswith("col_") and k[4:] in LABEL_FIELDS)}
        for column, field_name in named.items():
            if row.get(column) not in (None, ""):
                rec[field_name] = row[column]
        if not self.label:
            rec.update({k: row[k] for k in LABEL_FIELDS if row.get(k) not in (None, "")})
        return rec

    def row(self, row: dict[str, Any], path: Path, number: int, raw: str) -> dict[str, Any] | Reject:
        """A table row as a flat record, or its ``Reject`` in the table's terms when the message or
        the response cell is empty."""
        empty = [c for c in (self.user, self.assistant) if row.get(c) in (None, "")]
        if empty:
            cells = " and ".join(repr(c) for c in empty)
            return Reject(str(path), number, f"empty cell in column {cells}", "fill the cell or drop the row", raw)
        return self.record(row)

    def check(self, names: list[str], path: Path, flag: str) -> None:
        """A ``ValueError`` naming the missing column, the columns the table has and the flag to set."""
        for column, option in ((self.user, "--user_col"), (self.assistant, "--assistant_col"), (self.label, "--label_col")):
            if column and column not in names:
                shown = ", ".join(repr(n) for n in names[:20]) + (" …" if len(names) > 20 else "")
                raise ValueError(
                    f"{flag} {str(path)!r} has no column {column!r}; its columns are {shown}; name the right one with {option}"
                )


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
    if obj.get("out_of_scope") is not None:
        if obj["out_of_scope"] is not True:
            raise _Bad("field 'out_of_scope' must be true when present", 'write "out_of_scope": true, or drop the field')
        if "assistant" in obj:
            raise _Bad("an out-of-scope record has no 'assistant': the bot falls back on it", "drop 'assistant' or 'out_of_scope'")
        if "user" not in obj:
            raise _Bad("missing field 'user'", 'give the message the bot should not answer as "user"')
        context = tuple(_turns(obj["context"], "context")) if obj.get("context") else ()
        return [Pair(user=_text(obj["user"], "user"), assistant=OUT_OF_SCOPE, context=context, **common)]
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
            f"{flag} {str(path)!r} is a folder, not a file; pass a conversation file (.jsonl, .json, .csv, .parquet) (for a folder of drops use `bucketchat retrain --data_dir {path}`)"
        )
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is not a regular file; pass a conversation file (.jsonl, .json, .csv, .parquet)")
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


def iter_records(
    path: str | Path, strict: bool = False, max_line_bytes: int = MAX_LINE_BYTES, columns: Columns | None = None, flag: str = "--data"
) -> Iterator[Pair | Reject]:
    """Yield every pair in a conversation file, and a ``Reject`` for every record that cannot be
    used: each non-blank line (element, row) gives one or more pairs or exactly one reject.

    JSONL is read as bytes so one line of invalid UTF-8 is reported rather than aborting the whole
    file; text is checked and repaired by ``conversations.text`` (the one rule for every way text
    comes in). ``columns`` applies to tables (CSV, Parquet).
    """
    path = check_input(path, flag)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES or suffix == ".json":
        rows = _json_array(path) if suffix == ".json" else _table_rows(path, columns or Columns(), flag)
        for number, obj, raw in rows:
            bad = obj if isinstance(obj, Reject) else _read_object(obj, raw, str(path), number)
            if isinstance(bad, list):
                yield from bad
                continue
            if strict:
                raise RecordError(bad.message())
            yield bad
        return
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


def _json_array(path: Path) -> Iterator[tuple[int, Any, str]]:
    """The elements of a ``.json`` file holding one array (element number from 1)."""
    try:
        data = json.loads(decode_line(path.read_bytes()))
    except TextError as exc:
        raise ValueError(f"{str(path)!r}: {exc.reason}; {exc.fix}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); a .json file holds one array of records, a .jsonl file one record per line"
        ) from None
    if not isinstance(data, list):
        raise ValueError(
            f'{str(path)!r} holds a JSON {type(data).__name__}, not an array; write [{{"user": …, "assistant": …}}, …], or name the file .jsonl for one record per line'
        )
    for number, obj in enumerate(data, start=1):
        yield number, obj, json.dumps(obj, ensure_ascii=False)[:2000]


def _table_rows(path: Path, columns: Columns, flag: str) -> Iterator[tuple[int, dict | Reject, str]]:
    """The rows of a CSV/TSV (file line of the row's end, so multi-line cells count) or Parquet file
    (row number), as flat records or, for an empty cell, its reject."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"{flag} {str(path)!r} is not a readable Parquet file ({exc}); export the table again") from None
        columns.check(table.schema_arrow.names, path, flag)
        number = 0
        for batch in table.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                number += 1
                raw = json.dumps(row, ensure_ascii=False, default=str)[:2000]
                yield number, columns.row(row, path, number, raw), raw
        return
    # Undecodable bytes become lone surrogates here and are rejected row by row, as in JSONL.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        head = fh.read(65536)
        fh.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        if path.suffix.lower() == ".csv":
            try:
                delimiter = csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
            except csv.Error:
                pass  # one column, or too little to tell: commas
        csv.field_size_limit(MAX_LINE_BYTES)
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            columns.check(list(reader.fieldnames or []), path, flag)
        except csv.Error as exc:
            raise ValueError(f"{flag} {str(path)!r} line {reader.line_num}: not readable as CSV ({exc}); check its quoting") from None
        for row in _csv_rows(reader, path, flag):
            raw = delimiter.join(v if isinstance(v, str) else "" for v in row.values())
            row.pop(None, None)  # cells past the header's columns
            raw = raw.encode("utf-8", "replace").decode("utf-8")
            yield reader.line_num, columns.row(row, path, reader.line_num, raw), raw


def _csv_rows(reader: csv.DictReader, path: Path, flag: str) -> Iterator[dict]:
    """The reader's rows; a row the csv module cannot parse (an unclosed quote, a cell over 1 MiB)
    stops the file with its line number: what follows it cannot be told apart."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"{flag} {str(path)!r} line {reader.line_num}: not readable as CSV ({exc}); fix that line's quoting") from None
        yield row


# What a record with broken text is told: a table or JSON array (the bytes were decoded as a whole),
# and a JSONL line (bytes checked already, so only a \u escape can make a lone surrogate).
NOT_UNICODE = (
    "holds text that is not valid Unicode (bytes that are not UTF-8, or a lone \\uD800-\\uDFFF escape)",
    "save the file as UTF-8, with each character written as itself",
)
LONE_SURROGATE = (
    "holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair)",
    "write the character itself in UTF-8, or escape it as a full surrogate pair",
)


def _read_object(
    obj: Any, raw: str, path: str, number: int, broken: tuple[str, str] = NOT_UNICODE, whole: str = "the record", scan: bool = True
) -> list[Pair] | Reject:
    """The pairs of one decoded record (a JSON value, a table row), or its ``Reject``; ``scan``
    False skips looking for broken text where none can be."""
    try:
        where = _surrogate_field(obj) if scan else None
    except RecursionError:
        return Reject(path, number, "JSON nested too deeply", "flatten the record", raw[:200])
    if where is not None:
        return Reject(path, number, f"{f'field {where!r}' if where else whole} {broken[0]}", broken[1], raw)
    try:
        return parse_record(obj, Path(path).stem, number)
    except _Bad as exc:
        return Reject(path, number, exc.reason, exc.fix, raw)


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
    return _read_object(obj, text, path, number, LONE_SURROGATE, "the line", scan="\\u" in text)


def require_pairs(path: str | Path, flag: str = "--data", columns: Columns | None = None) -> None:
    """``ValueError`` unless ``path`` holds at least one usable pair; reads only up to the first one,
    so a good file costs a line and a useless one is reported before any work starts."""
    rejects: list[Reject] = []
    for item in iter_records(path, columns=columns, flag=flag):
        if isinstance(item, Pair):
            return
        rejects.append(item)
    if not rejects:
        raise ValueError(
            f'{flag} {str(path)!r} is empty; it needs conversations: one JSON object per line (.jsonl), e.g. {{"user": "hi", "assistant": "hello"}}, or a table (.csv, .parquet) with a row per pair'
        )
    first = rejects[0]
    raise ValueError(
        f"{flag} {str(path)!r} holds no usable conversation: all {len(rejects):,} of its non-blank records were rejected, the first at line {first.line}: {first.reason}. Fix: {first.fix}"
    )


def load_records(path: str | Path, strict: bool = False, columns: Columns | None = None) -> tuple[list[Pair], list[Reject]]:
    pairs: list[Pair] = []
    rejects: list[Reject] = []
    for item in iter_records(path, strict=strict, columns=columns):
        (pairs if isinstance(item, Pair) else rejects).append(item)
    return pairs, rejects
