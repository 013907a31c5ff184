"""Build a table version's search index on disk, a batch of rows at a time (the reading side is
retrieval/index_files.py, the searching side retrieval/search.py).

Memory stays flat in the table's size but for a few small arrays per row (cell, bucket, sorted
position, the BM25 postings): the vectors, ~1.5 KB a row, are never all in memory. Two passes over
the rows, in the table's order:

1. cells and buckets: each row's vector against the inverted file's centroids (trained first on a
   sample read by row number), and each row's BM25 terms;
2. each row's vector written at its sorted position in ``vectors.npy`` (a memory map opened per
   batch), and the payload columns appended as they come, in the table's order: ``rows.npy`` maps a
   sorted position back to its row, and the reader goes through it.

Rows are sorted by (cell, bucket), so a cell's rows of one bucket are a contiguous slice: the
bucket prefilter is a choice of slices, not a scan (retrieval/search.py).

BM25 (k1 1.2, b 0.75) over lower-cased word tokens without English stop words: the tokens, stop list
and alphabetical vocabulary of scikit-learn's CountVectorizer, which an earlier version of this
module used; the postings are a term x row CSR matrix of precomputed per-posting scores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.atomic import atomic_dir, failpoint
from models.memory import batch_rows, release
from retrieval.search import BM25_B, BM25_K1, COLUMNS, IVF_MIN_ROWS, query_terms

PER_CELL = 40  # sample rows per IVF cell that train its centroids (faiss trains IVF on 39-256)

# Negations carry meaning in support messages ("card not working"); keep them out of the stop list.
_KEEP = frozenset({"no", "not", "nor", "cannot", "never", "none", "nothing", "nobody", "without"})


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS - _KEEP)


class Rows:
    """What the builder reads: ``count`` rows of ``dim``-d unit vectors, ``batches(columns)`` (Arrow
    record batches in the table's order: ``vector``, ``bucket``, ``user`` and the payload columns)
    and ``take(rows)`` (the vectors of those row numbers)."""

    count: int
    dim: int
    payload: list[str]

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TableRows(Rows):
    """The rows of a checked-out LanceDB table version, read through LanceDB's own queries."""

    def __init__(self, tbl):
        self.tbl = tbl
        self.count = tbl.count_rows()
        self.dim = tbl.schema.field("vector").type.list_size
        self.payload = [c for c in COLUMNS if c != "bucket"]

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        # Row ranges taken by offset, not a scan: a scan reads ahead as far as its I/O buffer allows
        # (gigabytes) when the reader is slower than the disk, which this one is.
        step = batch_rows(self.dim)
        for a in range(0, self.count, step):
            release()
            yield self.take_rows(range(a, min(a + step, self.count)), columns)

    def take_rows(self, rows, columns: list[str]) -> pa.RecordBatch:
        # A take returns rows grouped by fragment; row ids sort them back into offset order.
        got = self.tbl.take_offsets(list(rows)).select(columns).with_row_id().to_arrow().sort_by("_rowid")
        return (
            got.select(columns).combine_chunks().to_batches()[0] if len(got) else pa.RecordBatch.from_pylist([], got.select(columns).schema)
        )

    def take(self, rows: np.ndarray) -> np.ndarray:
        return _vectors(self.take_rows(rows.tolist(), ["vector"]), self.dim)


class ArrayRows(Rows):
    """Rows held in memory (tests and small tables): vectors (N, D), users, buckets, payload lists.
    Strings go through as UTF-8 bytes with surrogate escapes, as the index stores them."""

    def __init__(self, vectors: np.ndarray, users: list[str], buckets, payload: dict[str, list]):
        n = len(vectors)
        if not (len(users) == len(buckets) == n and all(len(v) == n for v in payload.values())):
            raise ValueError("vectors, users, buckets and every payload column must have one entry per row")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.count, self.dim = n, self.vectors.shape[1] if n else 0
        self.users, self.buckets, self.columns = users, np.asarray(buckets, np.int64), payload
        self.payload = list(payload)

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        def column(name: str, a: int, b: int) -> pa.Array:
            if name == "vector":
                return pa.FixedSizeListArray.from_arrays(pa.array(self.vectors[a:b].reshape(-1)), self.dim)
            if name == "bucket":
                return pa.array(self.buckets[a:b])
            values = self.users[a:b] if name == "user" else self.columns[name][a:b]
            return pa.array([None if v is None else v.encode("utf-8", "surrogateescape") for v in values], pa.large_binary())

        step = batch_rows(self.dim)
        for a in range(0, self.count, step):
            b = min(a + step, self.count)
            yield pa.record_batch([column(c, a, b) for c in columns], names=columns)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.vectors[rows]


def _vectors(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    return batch.column("vector").flatten().to_numpy().reshape(len(batch), dim)


def _text(column: pa.Array) -> list[str]:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else v.decode("utf-8", "surrogateescape") for v in column.to_pylist()]
    return column.to_pylist()


def centroids(rows: Rows, cells: int, seed: int = 0, iters: int = 10) -> np.ndarray:
    """The inverted file's cells: spherical k-means on ``PER_CELL`` sampled rows per cell -> (cells,
    D) unit centroids. Seeded: the same table gives the same index in every process."""
    from retrieval.buckets import spherical_kmeans

    rng = np.random.default_rng(seed)
    sample = rows.take(np.sort(rng.choice(rows.count, min(PER_CELL * cells, rows.count), replace=False)))
    return spherical_kmeans(sample, cells, iters=iters, rng=rng, plus_plus=False)[0]


class _Terms:
    """BM25 term counting over a stream of texts: provisional term ids as they are first seen, one
    flat (row, term) array per batch; ``postings`` turns them into the CSR matrix once all are in."""

    def __init__(self):
        self.stop = stop_words()
        self.ids: dict[str, int] = {}
        self.rows: list[np.ndarray] = []
        self.terms: list[np.ndarray] = []

    def add(self, texts: list[str], first_row: int) -> None:
        rows, terms, ids, stop = [], [], self.ids, self.stop
        for i, text in enumerate(texts):
            for t in query_terms(text or ""):
                if t not in stop:
                    rows.append(first_row + i)
                    terms.append(ids.setdefault(t, len(ids)))
        self.rows.append(np.asarray(rows, np.int64))
        self.terms.append(np.asarray(terms, np.int64))

    def postings(self, position: np.ndarray) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
        """(vocabulary, indptr, rows, weights): each term's postings over sorted positions
        (``position[row]``), weighted by BM25."""
        n = len(position)
        vocab_sorted = sorted(self.ids)
        rank = np.empty(len(self.ids), np.int64)
        rank[[self.ids[t] for t in vocab_sorted]] = np.arange(len(vocab_sorted))
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
        terms = rank[np.concatenate(self.terms)] if self.rows and len(self.ids) else np.zeros(0, np.int64)
        self.rows = self.terms = []
        # (term, sorted position) pairs with their counts, in CSR order: term major, position minor.
        keys, tf = np.unique(terms * max(n, 1) + position[rows], return_counts=True)
        term, pos = keys // max(n, 1), keys % max(n, 1)
        tf = tf.astype(np.float32)
        lengths = np.bincount(pos, weights=tf, minlength=n).astype(np.float32)
        df = np.bincount(term, minlength=len(vocab_sorted)).astype(np.float32)
        idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))  # Lucene's BM25 idf: never negative
        avg = float(lengths.mean()) if n and lengths.mean() > 0 else 1.0
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * lengths[pos] / avg)
        weight = (idf[term] * tf * (BM25_K1 + 1.0) / (tf + norm)).astype(np.float32)
        indptr = np.zeros(len(vocab_sorted) + 1, np.int64)
        np.cumsum(np.bincount(term, minlength=len(vocab_sorted)), out=indptr[1:])
        return {t: i for i, t in enumerate(vocab_sorted)}, indptr, pos.astype(np.int32), weight


class _StringsWriter:
    """A payload column appended a batch at a time: UTF-8 bytes to ``NAME.bytes``, N + 1 offsets and
    (if any) the null flags kept until ``close`` (8 bytes a row)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.file = open(folder / f"{name}.bytes", "wb")
        self.offsets, self.nulls, self.at = [np.zeros(1, np.int64)], [], 0

    def add(self, column: pa.Array) -> None:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())
        elif not pa.types.is_large_binary(column.type):
            column = column.cast(pa.large_binary())
        column = pa.concat_arrays([column]) if column.offset else column  # buffers from 0
        offsets = np.frombuffer(column.buffers()[1], np.int64)[: len(column) + 1]
        data = column.buffers()[2]
        if len(column):
            self.file.write(memoryview(data)[offsets[0] : offsets[-1]] if data is not None else b"")
        self.offsets.append(self.at + offsets[1:] - offsets[0])
        self.at += int(offsets[-1] - offsets[0])
        self.nulls.append(column.is_null().to_numpy(zero_copy_only=False))

    def close(self) -> None:
        self.file.close()
        np.save(self.folder / f"{self.name}.offsets.npy", np.concatenate(self.offsets))
        nulls = np.concatenate(self.nulls) if self.nulls else np.zeros(0, bool)
        if nulls.any():
            np.save(self.folder / f"{self.name}.nulls.npy", nulls)


def _write_strings(folder: Path, name: str, values: list[str]) -> None:
    out = _StringsWriter(folder, name)
    out.add(pa.array([v.encode("utf-8", "surrogateescape") for v in values], pa.large_binary()))
    out.close()


def write_index(rows: Rows, folder: Path, about: dict, seed: int = 0, log: Callable[[str], None] | None = None) -> None:
    """Build ``rows``' search index into ``folder``, whole or not at all (filled under a temporary
    name, then renamed); ``about`` goes into its ``index.json`` (retrieval/index_files.py says what)."""
    start = time.perf_counter()
    n = rows.count
    cells = int(round(np.sqrt(n))) if n >= IVF_MIN_ROWS else 1
    cents = centroids(rows, cells, seed) if cells > 1 else np.zeros((1, rows.dim), np.float32)

    # Pass 1: each row's cell, bucket and terms.
    cell, bucket, terms, at = np.zeros(n, np.int64), np.zeros(n, np.int64), _Terms(), 0
    for batch in rows.batches(["vector", "bucket", "user"]):
        m = len(batch)
        if cells > 1:
            cell[at : at + m] = np.argmax(_vectors(batch, rows.dim) @ cents.T, axis=1)
        bucket[at : at + m] = batch.column("bucket").to_numpy(zero_copy_only=False)
        terms.add(_text(batch.column("user")), at)
        at += m
    if n and bucket.min() < 0:
        raise ValueError(f"bucket numbers must be 0 or more, got {int(bucket.min())}; rebuild the table with `bucketchat db build`")
    num_buckets = int(bucket.max()) + 1 if n else 0
    order = np.lexsort((bucket, cell))  # sorted position -> row
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    keys = cell[order] * (num_buckets + 1) + bucket[order]
    grid = np.arange(cells)[:, None] * (num_buckets + 1) + np.arange(num_buckets + 1)[None, :]
    vocab, indptr, post_rows, post_weights = terms.postings(position)
    del terms, cell
    if log:
        log(f"search index: {n:,} rows, {cells:,} cells, {len(vocab):,} terms; writing")

    with atomic_dir(folder) as tmp:
        arrays = {
            "buckets": bucket[order],
            "rows": order,
            "centroids": cents.astype(np.float32),
            "slices": np.searchsorted(keys, grid).astype(np.int64),  # (cells, K + 1)
            "post_indptr": indptr,
            "post_rows": post_rows,
            "post_weights": post_weights,
        }
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        del keys, arrays
        # Pass 2: vectors to their sorted positions, payload columns in the table's order.
        np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, rows.dim)).flush()
        strings = {c: _StringsWriter(tmp, c) for c in rows.payload if c != "assistant"}
        responses: dict[str, int] = {}
        codes, at = np.zeros(n, np.int32), 0
        for batch in rows.batches(["vector", "bucket", *rows.payload]):
            m = len(batch)
            if not np.array_equal(batch.column("bucket").to_numpy(zero_copy_only=False), bucket[at : at + m]):
                raise RuntimeError(
                    f"the table's rows came back in another order on the second read (rows {at:,}-{at + m:,}); build the index again"
                )
            # A map per batch: its dirty pages are written back when it closes, so the process
            # never holds the whole file resident.
            out = np.load(tmp / "vectors.npy", mmap_mode="r+")
            out[position[at : at + m]] = _vectors(batch, rows.dim)
            out.flush()
            del out
            for c, writer in strings.items():
                writer.add(batch.column(c))
            if "assistant" in rows.payload:
                codes[at : at + m] = [responses.setdefault(r, len(responses)) for r in _text(batch.column("assistant"))]
            at += m
        for writer in strings.values():
            writer.close()
        if "assistant" in rows.payload:  # few distinct responses: each once, and a code per row
            np.save(tmp / "assistant.codes.npy", codes)
            _write_strings(tmp, "assistant.values", list(responses))
        (tmp / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.__getitem__)), encoding="utf-8", errors="surrogateescape")
        meta = {**about, "rows": n, "columns": rows.payload, "build_s": round(time.perf_counter() - start, 3)}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        for path in tmp.iterdir():  # on disk before the rename makes it visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        failpoint("index:written")
