"""Datasets on disk: read JSONL or Parquet into pairs; write Parquet (for the pipeline) + JSONL (for
people) and the rejects file, all atomically."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conversations.records import Columns, Pair, Reject, iter_records, load_records
from conversations.text import json_line
from models.atomic import atomic_path

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("user", pa.string()),
        ("assistant", pa.string()),
        ("context", pa.string()),  # JSON list of {"role", "content"}
        ("label", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("turn", pa.int32()),
        ("parent_id", pa.string()),
        ("op", pa.string()),
        ("meta", pa.string()),  # JSON object of the record's extra fields
    ]
)


DATA_SUFFIXES = (".jsonl", ".parquet", ".db")


def sibling(path: str | Path, suffix: str) -> Path:
    """``path`` with its data suffix (.jsonl, .parquet, .db) replaced by ``suffix``; other dots in the
    name stay (``Path.with_suffix`` would turn ``conversation_data.sample`` into ``conversation_data``)."""
    path = Path(path)
    name = path.name
    for known in DATA_SUFFIXES:
        if name.endswith(known):
            name = name[: -len(known)]
            break
    return path.with_name(name + suffix)


def rejects_path(output: str | Path) -> Path:
    """The rejects file that sits beside an output: ``data.jsonl`` -> ``data.rejects.jsonl``."""
    return sibling(output, ".rejects.jsonl")


def iter_parquet(path: str | Path, batch_size: int = 8192) -> Iterator[Pair]:
    """Stream the pairs of a ``.parquet`` dataset this project wrote, a record batch at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            context = tuple((t["role"], t["content"]) for t in json.loads(row["context"] or "[]"))
            yield Pair(
                user=row["user"],
                assistant=row["assistant"],
                context=context,
                label=row["label"],
                source=row["source"] or "",
                line=row["line"],
                turn=row["turn"],
                parent_id=row["parent_id"],
                op=row["op"] or "original",
                meta=json.loads(row["meta"] or "{}"),
            )


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a ``.parquet`` dataset this project wrote (an earlier stage's output, whose
    rejects were written then), rather than a table of conversations a user brings."""
    if Path(path).suffix.lower() != ".parquet":
        return False
    try:
        return set(SCHEMA.names) <= set(pq.read_schema(path).names)
    except Exception:  # noqa: BLE001 - not Parquet at all: the reader says so, with the fix
        return False


def read_pairs(path: str | Path, strict: bool = False, columns: Columns | None = None) -> tuple[list[Pair], list[Reject]]:
    """Pairs from a dataset this project wrote, or from any conversation file (JSONL, a JSON
    array, CSV, Parquet; ``columns`` names a table's columns)."""
    if is_dataset(path):
        return list(iter_parquet(path)), []
    return load_records(path, strict=strict, columns=columns)


def read_input(
    path: str | Path, output: str | Path, strict: bool = False, columns: Columns | None = None
) -> tuple[list[Pair], int, str | None]:
    """Read a stage's input; for a conversation file, write its rejects beside ``output``.

    Returns (pairs, rejected record count, rejects path or None). A dataset an earlier stage wrote
    already had its rejects written; rewriting them here would erase them.
    """
    pairs, rejects = read_pairs(path, strict=strict, columns=columns)
    written = None if is_dataset(path) else write_rejects(rejects, output)
    if not pairs:
        raise _no_pairs(path, rejects, written)
    return pairs, len(rejects), written


class InputStream:
    """``read_input`` a pair at a time, for inputs too big to hold as Python objects (~1 KB a pair):
    ``for pair in stream``. When the iteration ends the rejects are written beside ``output`` (for a
    conversation file), counted in ``rejected``, and a file without a single usable pair raises
    ``read_input``'s error unless ``allow_empty`` (one of several sources, judged together later).
    Iterate it once."""

    def __init__(
        self, path: str | Path, output: str | Path, strict: bool = False, columns: Columns | None = None, allow_empty: bool = False
    ):
        self.path, self.output, self.strict, self.columns = path, output, strict, columns
        self.allow_empty = allow_empty
        self.pairs, self.rejected, self.rejects_file = 0, 0, None

    def __iter__(self) -> Iterator[Pair]:
        if is_dataset(self.path):
            for pair in iter_parquet(self.path):
                self.pairs += 1
                yield pair
            rejects: list[Reject] = []
        else:
            rejects = []
            for item in iter_records(self.path, strict=self.strict, columns=self.columns):
                if isinstance(item, Pair):
                    self.pairs += 1
                    yield item
                else:
                    rejects.append(item)
            self.rejects_file = write_rejects(rejects, self.output)
        self.rejected = len(rejects)
        if not self.pairs and not self.allow_empty:
            raise _no_pairs(self.path, rejects, self.rejects_file)


def _no_pairs(path: str | Path, rejects: list[Reject], written: str | None) -> ValueError:
    return ValueError(
        f"{str(path)!r} holds no usable conversation pairs"
        + (f" ({len(rejects):,} rejected lines, each in {written} with its reason)" if rejects else "")
        + "; add data or fix the rejected lines"
    )


def pairs_table(pairs: Iterable[Pair]) -> pa.Table:
    rows = [
        {
            "id": p.id,
            "user": p.user,
            "assistant": p.assistant,
            "context": json.dumps([{"role": r, "content": c} for r, c in p.context], ensure_ascii=False),
            "label": p.label,
            "source": p.source,
            "line": p.line,
            "turn": p.turn,
            "parent_id": p.parent_id,
            "op": p.op,
            "meta": json.dumps(p.meta, ensure_ascii=False, sort_keys=True),
        }
        for p in pairs
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json_line(rec))


WRITE_BATCH = 8192  # pairs per Parquet row group: what a streaming write holds at a time


def write_dataset(pairs: Iterable[Pair], output: str | Path) -> dict[str, str]:
    """Write ``output`` (``.jsonl`` or ``.parquet``) plus its sibling in the other format, in one
    pass over ``pairs`` (any iterable: a generator is never held whole), both files atomically.

    Returns ``{"jsonl": path, "parquet": path}``; the Parquet file is what later stages read.
    """
    jsonl, parquet = sibling(output, ".jsonl"), sibling(output, ".parquet")
    with atomic_path(parquet) as ptmp, atomic_path(jsonl) as jtmp, open(jtmp, "w", encoding="utf-8") as fh:
        with pq.ParquetWriter(ptmp, SCHEMA) as writer:
            batch: list[Pair] = []
            for p in pairs:
                fh.write(json_line(p.to_record()))
                batch.append(p)
                if len(batch) == WRITE_BATCH:
                    writer.write_table(pairs_table(batch))
                    batch = []
            if batch:  # a count divisible by WRITE_BATCH left nothing: no empty row group
                writer.write_table(pairs_table(batch))
    return {"jsonl": str(jsonl), "parquet": str(parquet)}


def write_rejects(rejects: list[Reject], output: str | Path) -> str:
    """Write the rejects beside ``output`` (always, so an empty file says 'nothing was rejected')."""
    path = rejects_path(output)
    write_jsonl(path, (r.to_record() for r in rejects))
    return str(path)


_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case, Unicode form and whitespace do not make a record new."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
