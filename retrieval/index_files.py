"""The search index of one table version, on disk beside it: built once, opened memory-mapped.

A pinned table version never changes, so its search index (retrieval/search.py) never does either. ``db build`` writes it next to the version it indexes; chat and serve open it with
``np.load(mmap_mode="r")``: nothing is rebuilt at start-up, the opening costs the same at 1M rows
as at 1k, several server processes share the same pages, and a chat process needs neither LanceDB
nor scikit-learn before its first answer. A version built before indexes were saved is indexed on
first use, once.

Layout: ``<db>/_search_index/<table>-v<version>/`` (for an object-store table, the same under its
local side folder, ``store.local_dir``) holds ``index.json`` (what it indexes and how), one ``.npy``
per array, the BM25 vocabulary one term a line, and each payload column as UTF-8 bytes plus row
offsets, in the table's order (``rows.npy`` maps a sorted position to its row; the responses column
as a code per row and each distinct response once). retrieval/index_build.py writes it. The folder is written under a temporary name and renamed: it is whole or absent.

Which version it is: ``index.json`` records a fingerprint of the version's LanceDB manifest file
(a hash of its bytes), so a table deleted and rebuilt up to the same version number is not mistaken
for the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from retrieval.locations import local_dir
from retrieval.search import SearchIndex

FORMAT = 2  # 1: payload in sorted order (an index built in memory); indexes of another format are built again

INDEX_DIR = "_search_index"
# An index of format 2 built before the probe count became a search setting also holds nprobe.npy: unread.
_ARRAYS = ("vectors", "buckets", "rows", "centroids", "slices", "post_indptr", "post_rows", "post_weights")


class Strings:
    """A column of N strings (or None) stored as one UTF-8 byte array and N + 1 offsets, read through
    ``order`` (sorted position -> row) when given; a row is decoded when it is read, so a
    memory-mapped column costs pages, not Python objects."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray, nulls: np.ndarray | None = None, order: np.ndarray | None = None):
        self.offsets, self.blob, self.nulls, self.order = offsets, blob, nulls, order

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        if self.order is not None:
            i = int(self.order[i])
        if self.nulls is not None and self.nulls[i]:
            return None
        return bytes(self.blob[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Coded:
    """A column of few distinct values: ``values[codes[i]]`` is row i's (the responses column, whose
    distinct values the chat engine maps to its candidates once instead of once per row)."""

    def __init__(self, values: list, codes: np.ndarray):
        self.values, self.codes = values, codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int):
        return self.values[self.codes[i]]

    def __iter__(self):
        return (self.values[c] for c in self.codes.tolist())


def distinct(column) -> tuple[list, np.ndarray]:
    """(distinct values in first-seen order, each row's position among them) of a payload column."""
    if isinstance(column, Coded):
        return column.values, column.codes
    seen: dict = {}
    codes = np.fromiter((seen.setdefault(v, len(seen)) for v in column), dtype=np.int64, count=len(column))
    return list(seen), codes


def _map(path: Path, dtype) -> np.ndarray:
    """A raw file memory-mapped (an empty one cannot be mapped: an empty array)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def _load_strings(folder: Path, name: str, order: np.ndarray | None = None) -> Strings:
    nulls = folder / f"{name}.nulls.npy"
    return Strings(
        np.load(folder / f"{name}.offsets.npy", mmap_mode="r"),
        _map(folder / f"{name}.bytes", np.uint8).view(np.ndarray),
        np.load(nulls, mmap_mode="r") if nulls.is_file() else None,
        order,
    )


def version_fingerprint(db: str | Path, table: str, version: int) -> str:
    """What identifies ``table@version`` beyond its number: a hash of its LanceDB manifest file
    (named ``2**64 - 1 - version`` since LanceDB's V2 naming, ``version`` before), or for an
    object-store table the version's commit time, read through LanceDB."""
    versions = Path(str(db)) / f"{table}.lance" / "_versions"
    for name in (f"{2**64 - 1 - version:020d}.manifest", f"{version}.manifest"):
        path = versions / name
        if path.is_file():
            return "manifest:" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    from retrieval.store import open_table

    for v in open_table(db, table).list_versions():
        if int(v["version"]) == version:
            return f"committed:{v['timestamp']}"
    raise ValueError(f"--db {str(db)!r}: table {table!r} has no version {version}; rebuild it with `bucketchat db build`")


def index_dir(db: str | Path, table: str, version: int) -> Path:
    return local_dir(db) / INDEX_DIR / f"{table}-v{version}"


def load_index(folder: Path) -> tuple[SearchIndex, dict]:
    """The index saved in ``folder``, memory-mapped, and its ``index.json``."""
    about = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    parts = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    order = parts["rows"].view(np.ndarray)
    payload = {}
    for name in about["columns"]:
        if name == "assistant":
            values = list(_load_strings(folder, "assistant.values"))
            # Sorted order in memory (4 bytes a row): the chat engine maps codes to candidates with numpy.
            payload[name] = Coded(values, np.load(folder / "assistant.codes.npy", mmap_mode="r")[order])
        else:
            payload[name] = _load_strings(folder, name, order)
    terms = (folder / "vocab.txt").read_text(encoding="utf-8", errors="surrogateescape")
    vocab = dict(zip(terms.split("\n"), range(len(parts["post_indptr"]) - 1))) if terms else {}
    return SearchIndex.from_parts(parts, payload, vocab, about.get("build_s", 0.0)), about


def open_index(db: str | Path, table: str, version: int) -> tuple[SearchIndex, dict]:
    """``table@version``'s search index and what it records (``encoder``, ``rows``…): the saved one
    when it is there and of this very version, else built from the table now and saved for next time."""
    folder = index_dir(db, table, version)
    fingerprint = version_fingerprint(db, table, version)
    if (folder / "index.json").is_file():
        index, about = load_index(folder)
        if about.get("format") == FORMAT and about.get("fingerprint") == fingerprint:
            return index, about
        shutil.rmtree(folder, ignore_errors=True)  # another table's version of the same number
    return build_index(db, table, version, fingerprint)


def build_index(db: str | Path, table: str, version: int, fingerprint: str | None = None) -> tuple[SearchIndex, dict]:
    """Index ``table@version`` from LanceDB and save it beside the version."""
    from retrieval.store import open_table, table_encoder

    tbl = open_table(db, table, version)
    about = {
        "table": table,
        "version": version,
        "fingerprint": fingerprint or version_fingerprint(db, table, version),
        "encoder": table_encoder(tbl),
    }
    folder = index_dir(db, table, version)
    from retrieval.index_build import TableRows, write_index  # building only: opening needs none of it

    write_index(TableRows(tbl), folder, {"format": FORMAT, **about}, log=logging.getLogger(__name__).info)
    return load_index(folder)


def index_from_arrays(vectors: np.ndarray, users: list[str], buckets, payload: dict[str, list], seed: int = 0) -> SearchIndex:
    """A search index of rows held in memory (tests, benchmarks), built as a table version's is and
    opened from a temporary folder (its maps outlive the files' names)."""
    import tempfile

    from retrieval.index_build import ArrayRows, write_index

    with tempfile.TemporaryDirectory() as tmp:
        write_index(ArrayRows(vectors, users, buckets, payload), Path(tmp) / "ix", {"format": FORMAT}, seed)
        index, _ = load_index(Path(tmp) / "ix")
    return index
