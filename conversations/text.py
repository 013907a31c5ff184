"""Where text enters bucketchat: one rule for data files, piped chat and HTTP requests.

Every message and every field of a conversation record passes ``clean_text`` (files through
``conversations/records.py``, chat and the server through ``ChatEngine.answer``), and every line of bytes
passes ``decode_line``. What is valid is decided here and nowhere else.

Repaired, silently and always the same way:

- a UTF-8 byte-order mark (U+FEFF) at the start of a file, a line or a text is dropped;
- CRLF and lone CR become LF; leading and trailing whitespace is stripped;
- NUL and the other control characters (C0, DEL and C1, but not tab and newline) become a space.

Rejected, with a reason and a fix (a file's line goes to the rejects file, a piped chat line gets an
``error``, an HTTP request a 400):

- bytes that are not UTF-8 (a file saved as Latin-1 or cp1252, or a mix of encodings);
- a lone UTF-16 surrogate (a JSON ``\\ud800`` escape without its pair): no UTF-8 text can hold it;
- text that is empty once repaired, or longer than the caller's limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

BOM = "\ufeff"
# Chat messages and HTTP contents longer than this are refused: the encoder reads only the first
# 256 word pieces (~1,000 characters) anyway, and a bounded message keeps a turn's cost bounded.
MAX_MESSAGE_CHARS = 4000
# A file line longer than this is rejected unread: no real conversation is this long, and reading it
# whole would let one bad line take the process's memory.
MAX_LINE_BYTES = 1 << 20
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # Cc less tab, newline (CR is handled first)
_SURROGATE = re.compile("[\ud800-\udfff]")


class TextError(ValueError):
    """Text that cannot be used, with what is wrong and how to fix it."""

    def __init__(self, code: str, reason: str, fix: str):
        super().__init__(f"{reason}; {fix}")
        self.code, self.reason, self.fix = code, reason, fix  # code: surrogate, empty, too_long or encoding


def clean_text(text: str, field: str = "message", limit: int | None = None) -> str:
    """``text`` repaired as the module docstring says, or ``TextError`` naming ``field``.

    >>> clean_text("\\ufeffhi\\r\\nthere\\x00!")
    'hi\\nthere !'
    """
    bad = _SURROGATE.search(text)
    if bad:
        raise TextError(
            "surrogate",
            f"{field} holds a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} (a \\u{ord(bad.group()):04x} escape without its pair)",
            "write the character itself in UTF-8, or escape it as a full surrogate pair",
        )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text).strip().lstrip(BOM).strip()
    if not text:
        raise TextError("empty", f"{field} is empty", f"give {field} some text")
    if limit is not None and len(text) > limit:
        raise TextError("too_long", f"{field} is {len(text):,} characters, over the {limit:,}-character limit", f"shorten {field}")
    return text


def decode_line(raw: bytes) -> str:
    """One line of bytes as text: UTF-8, line end and a leading byte-order mark removed.

    Raises ``TextError`` saying at which byte the UTF-8 breaks.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(
            "encoding", f"invalid UTF-8 at byte {exc.start}", "save the input as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE`)"
        ) from None
    return text.rstrip("\r\n").lstrip(BOM)


# Line breaks to str.splitlines() and to some editors, though JSON allows them raw in a string.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(obj) -> str:
    """One JSONL line (with its newline): UTF-8 text kept readable, but every character that any
    reader might take for a line break escaped, so one record is always one line."""
    import json

    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def clean_turns(turns: list[str], field: str = "an earlier turn") -> list[str]:
    """Earlier turns of a conversation, cleaned; a turn that is empty once repaired is dropped."""
    out = []
    for turn in turns:
        try:
            out.append(clean_text(turn, field))
        except TextError as exc:
            if exc.code != "empty":
                raise
    return out


def read_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[bytes, int]]:
    """(line, its full length in bytes) for each line of a binary stream.

    A line over ``limit`` bytes comes back cut to its first 200 bytes, and the rest of it is skipped
    in bounded chunks rather than read into memory: one bad line cannot take the process's memory.
    """
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
