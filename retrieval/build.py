"""Build a new version of a conversation table from pairs, a batch of rows at a time.

Memory stays flat in the number of rows but for a few bytes a row (hashes, codes, group numbers):
the pairs (~1 KB a row as Python objects) and their vectors (1.5 KB a row) are never all in
memory. At 1M rows holding them cost a 12.4 GB peak (BENCHMARKS.md). The passes:

1. spool: each pair's columns go to a Parquet file in a build folder beside the table; kept per row
   are its message's hash and its label and response codes, and the content key is hashed on the
   way, so an unchanged table stops here;
2. vectors: one float32 file with a row per distinct text (the messages, and the responses of
   unlabelled groups), filled from the embedding cache shard by shard; the texts it lacks are
   embedded a chunk at a time and stored in the cache as they go (a killed build keeps them);
3. buckets: each group's vectors summed (retrieval/buckets.py clusters the groups);
4. write: the spooled rows with their group, bucket and vector, streamed into LanceDB as one version;
   then its indices. The search index is built from the version (retrieval/index_build.py).

Every build writes a new table version (``mode="overwrite"`` keeps the old versions readable), so a
model that pinned version N keeps answering from exactly version N after later rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conversations.dataset import normalise
from conversations.records import Pair
from models.memory import batch_rows, release
from models.processes import process_start
from retrieval.buckets import group_buckets, group_key
from retrieval.embedding_cache import EmbeddingCache, key_hashes
from retrieval.encoder import ENCODER_ID, embed, text_key
from retrieval.locations import build_dir, is_uri, local_dir
from retrieval.store import CACHE_DIR, connect, indexed, keep_encoder, read_columns, schema, write_version

BATCH_ROWS = 16_384  # pairs spooled at a time; vectors go in batches of models.memory.batch_rows
EMBED_ROWS = 4_096  # new texts embedded per call, between progress lines
_SPOOL = pa.schema([(name, pa.string()) for name in ("id", "user", "context", "assistant", "label", "source", "parent_id", "op")])


@dataclass(frozen=True)
class BuildResult:
    db: str
    table: str
    version: int
    rows: int
    embedded: int
    buckets: dict[int, int]
    reused: bool = False  # the latest version already held exactly these rows: nothing was written


class ContentKey:
    """What a table version is a function of, hashed a pair at a time: every row's fields in order,
    the bucketing settings and the encoder. Two builds with the same key would write identical rows."""

    def __init__(self, num_buckets: int, seed: int, encoder_id: str = ENCODER_ID):
        self.h = hashlib.sha256(f"v1\0{encoder_id}\0{num_buckets}\0{seed}\n".encode())

    def add(self, p: Pair) -> None:
        self.h.update(json.dumps([p.id, p.user, p.context, p.assistant, p.label, p.source, p.parent_id, p.op], ensure_ascii=False).encode())
        self.h.update(b"\n")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def content_key(pairs: Iterable[Pair], num_buckets: int, seed: int, encoder_id: str = ENCODER_ID) -> str:
    key = ContentKey(num_buckets, seed, encoder_id)
    for p in pairs:
        key.add(p)
    return key.hexdigest()


class _VectorFile:
    """(rows, dim) float32 on disk, created at the first write (its dimension is the encoder's). A
    map is opened per read or write and closed after it, so the process never holds the whole file
    resident: its pages are the kernel's to keep or drop."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows = path, rows

    def write(self, at: np.ndarray, vectors: np.ndarray) -> None:
        if not self.path.exists():
            np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.rows, vectors.shape[1])).flush()
        out = np.load(self.path, mmap_mode="r+")
        out[at] = vectors
        out.flush()
        del out

    def read(self, at: np.ndarray) -> np.ndarray:
        vectors = np.load(self.path, mmap_mode="r")
        got = np.asarray(vectors[at])  # a copy: the map closes here
        del vectors
        return got


class _Spool:
    """Pass 1: the pairs' columns to ``rows.parquet``; per row, the message's hash and label and
    response codes; the content key."""

    def __init__(self, folder: Path, key: ContentKey, encoder_id: str):
        self.path, self.key, self.encoder_id = folder / "rows.parquet", key, encoder_id
        self.labels: dict[str | None, int] = {}
        self.responses: dict[str, int] = {}
        self._hash, self._label, self._response, self.rows = [], [], [], 0

    def fill(self, pairs: Iterable[Pair]) -> None:
        with pq.ParquetWriter(self.path, _SPOOL) as out:
            batch: list[Pair] = []
            for p in pairs:
                self.key.add(p)
                batch.append(p)
                if len(batch) == BATCH_ROWS:
                    self._add(batch, out)
                    batch = []
            if batch:
                self._add(batch, out)
        self.hashes = np.concatenate(self._hash) if self._hash else np.zeros(0, np.uint64)
        self.label = np.concatenate(self._label) if self._label else np.zeros(0, np.int64)
        self.response = np.concatenate(self._response) if self._response else np.zeros(0, np.int64)
        del self._hash, self._label, self._response

    def _add(self, batch: list[Pair], out: pq.ParquetWriter) -> None:
        columns = {
            "id": [p.id for p in batch],
            "user": [p.user for p in batch],
            "context": [json.dumps([{"role": r, "content": c} for r, c in p.context], ensure_ascii=False) for p in batch],
            "assistant": [p.assistant for p in batch],
            "label": [p.label for p in batch],
            "source": [p.source for p in batch],
            "parent_id": [p.parent_id for p in batch],
            "op": [p.op for p in batch],
        }
        out.write_batch(pa.record_batch(columns, schema=_SPOOL))
        self._hash.append(key_hashes([text_key(p.user, self.encoder_id) for p in batch]))
        self._label.append(np.fromiter((self.labels.setdefault(p.label, len(self.labels)) for p in batch), np.int64, len(batch)))
        self._response.append(
            np.fromiter((self.responses.setdefault(p.assistant, len(self.responses)) for p in batch), np.int64, len(batch))
        )
        self.rows += len(batch)

    def batches(self, columns: list[str] | None = None, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(self.path).iter_batches(batch_size=rows, columns=columns)


@dataclass
class _Groups:
    keys: list[str]  # group number -> key, sorted
    of_row: np.ndarray  # (N,) group number per row
    response_pairs: list[tuple[int, str, int]]  # (group, response, rows) of unlabelled groups


def _groups(spool: _Spool) -> _Groups:
    """Each row's group (``buckets.group_key``): its label, else the one label its response has
    elsewhere, else its response. Worked out per distinct (label, response), not per row."""
    labels, responses = list(spool.labels), list(spool.responses)
    width = max(len(responses), 1)
    codes, of_row = np.unique(spool.label * width + spool.response, return_inverse=True)
    rows = np.bincount(of_row, minlength=len(codes))
    norm: dict[int, str] = {}
    pairs = []
    for code in codes.tolist():
        lab, r = divmod(code, width)
        pairs.append((labels[lab], r, norm.setdefault(r, normalise(responses[r]))))
    label_of: dict[str, set[str]] = {}
    for lab, _, n in pairs:
        if lab is not None:
            label_of.setdefault(n, set()).add(lab)
    inherited = {n: next(iter(labs)) for n, labs in label_of.items() if len(labs) == 1}
    keys = [group_key(lab if lab is not None else inherited.get(n), responses[r]) for lab, r, n in pairs]
    ordered = sorted(set(keys))
    number = {k: i for i, k in enumerate(ordered)}
    pair_group = np.fromiter((number[k] for k in keys), np.int64, len(keys))
    response_pairs = [(number[k], responses[r], int(c)) for k, (_, r, _), c in zip(keys, pairs, rows) if k.startswith("response:")]
    return _Groups(ordered, pair_group[of_row], response_pairs)


def _clear_stale(folder: Path) -> None:
    """Build folders of processes that are gone (a killed build's spool and vectors); a folder is
    named by its process's pid and start time, so a reused pid does not keep one alive."""
    for old in folder.glob("*-*-*"):
        pid, start, _ = old.name.split("-", 2)
        if not pid.isdigit() or process_start(int(pid)) != start:
            shutil.rmtree(old, ignore_errors=True)


def _fill_vectors(
    spool: _Spool,
    texts: np.ndarray,
    row_text: np.ndarray,
    responses: dict[str, int],
    cache: EmbeddingCache,
    out: _VectorFile,
    device: str,
    log,
) -> int:
    """Pass 2: every distinct text's vector into ``out`` (a row per entry of ``texts``, the sorted
    hashes): the cached ones shard by shard, the rest embedded and cached. Returns how many were embedded."""
    todo = ~cache.scatter(texts, out.write)
    missing = int(todo.sum())
    if not missing:
        return 0
    log(f"embedding {missing:,} new texts of {len(texts):,}")
    start, done, pending = time.perf_counter(), 0, {}

    def flush(writer) -> None:
        nonlocal done, pending
        at = np.fromiter(pending, np.int64, len(pending))
        vectors = embed(list(pending.values()), device=device, path=cache.encoder_path, encoder_id=cache.encoder_id)
        out.write(at, vectors)
        writer.add(list(pending.values()), vectors)
        done += len(pending)
        pending = {}
        rate = done / max(time.perf_counter() - start, 1e-9)
        log(f"embedded {done:,} of {missing:,} new texts ({rate:,.0f}/s, {(missing - done) / max(rate, 1e-9):,.0f} s left)")

    def candidates() -> Iterator[tuple[int, str]]:
        at = 0
        for batch in spool.batches(["user"]):
            users = batch.column("user").to_pylist()
            ids = row_text[at : at + len(users)]
            for i in np.flatnonzero(todo[ids]).tolist():
                yield int(ids[i]), users[i]
            at += len(users)
        yield from responses.items()

    with cache.writer() as writer:
        for i, text in candidates():
            if todo[i]:
                todo[i] = False
                pending[i] = text
                if len(pending) == EMBED_ROWS:
                    flush(writer)
        if pending:
            flush(writer)
    return done


def build_table(
    pairs: Iterable[Pair],
    db: str | Path,
    table: str,
    num_buckets: int = 10,
    seed: int = 0,
    device: str = "cpu",
    encoder: str | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Embed (through the cache), bucket and write ``pairs`` (any iterable, read once) as a new
    version of ``table``; ``encoder``: a sentence-transformers folder to embed with instead of the
    shipped MiniLM; ``log``: where progress lines go.

    When the latest version was built from the same rows and settings it is returned as it is
    (``reused``): an unchanged data drop writes no version, so models keep pinning the same one.
    """
    log = log or logging.getLogger(__name__).info
    if not is_uri(db):
        db = Path(db)
        db.mkdir(parents=True, exist_ok=True)
    encoder_id, encoder_path = keep_encoder(db, encoder) if encoder else (ENCODER_ID, None)
    builds = build_dir(db)
    builds.mkdir(parents=True, exist_ok=True)
    _clear_stale(builds)
    folder = builds / f"{os.getpid()}-{process_start(os.getpid())}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        spool = _Spool(folder, ContentKey(num_buckets, seed, encoder_id), encoder_id)
        spool.fill(pairs)
        if not spool.rows:
            raise ValueError("no usable records to build the table from; check the rejects file beside the data")
        key = spool.key.hexdigest()
        same = _unchanged(db, table, key)
        if same is not None:
            return same
        log(f"{spool.rows:,} rows read; {len(spool.responses):,} distinct responses")
        groups = _groups(spool)
        needed = list(dict.fromkeys(r for _, r, _ in groups.response_pairs))  # responses of unlabelled groups
        response_hashes = key_hashes([text_key(r, encoder_id) for r in needed])
        texts = np.unique(np.concatenate([spool.hashes, response_hashes]))
        row_text = np.searchsorted(texts, spool.hashes)
        del spool.hashes
        vectors = _VectorFile(folder / "vectors.npy", len(texts))
        cache = EmbeddingCache(local_dir(db) / CACHE_DIR, encoder_id, encoder_path)
        at_response = dict(zip(needed, np.searchsorted(texts, response_hashes).tolist()))
        embedded = _fill_vectors(spool, texts, row_text, {at_response[r]: r for r in needed}, cache, vectors, device, log)
        bucket_of_row = _buckets(spool.rows, row_text, groups, at_response, vectors, num_buckets, seed)
        data = _rows(spool, groups, bucket_of_row, row_text, vectors, schema(encoder_id, content=key, dim=_dim(vectors)))
        version = write_version(db, table, data, spool.rows)
        counts = np.bincount(bucket_of_row, minlength=num_buckets)
        buckets = {b: int(c) for b, c in enumerate(counts.tolist()) if c}
        return BuildResult(str(db), table, version, spool.rows, embedded, buckets)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _dim(vectors: _VectorFile) -> int:
    return int(np.load(vectors.path, mmap_mode="r").shape[1])


def _buckets(
    rows: int, row_text: np.ndarray, groups: _Groups, at_response: dict[str, int], vectors: _VectorFile, num_buckets: int, seed: int
) -> np.ndarray:
    """Pass 3: each group's user and response vectors summed, the groups clustered -> bucket per row."""
    from scipy import sparse

    dim, count = _dim(vectors), len(groups.keys)
    user_sums, step = np.zeros((count, dim)), batch_rows(dim)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        release()
        member = sparse.csr_matrix((np.ones(b - a), (groups.of_row[a:b], np.arange(b - a))), shape=(count, b - a))
        user_sums += member @ vectors.read(row_text[a:b]).astype(np.float64)
    # A labelled group's rows stand in for its responses; an unlabelled group's responses are summed,
    # each distinct response read once and weighted by its rows.
    response_sums = user_sums.copy()
    pairs = groups.response_pairs
    for g in {g for g, _, _ in pairs}:
        response_sums[g] = 0.0
    for a in range(0, len(pairs), step):
        chunk = pairs[a : a + step]
        got = vectors.read(np.asarray([at_response[r] for _, r, _ in chunk], np.int64)).astype(np.float64)
        np.add.at(response_sums, [g for g, _, _ in chunk], got * np.asarray([n for _, _, n in chunk], np.float64)[:, None])
    counts = np.bincount(groups.of_row, minlength=count)
    group_bucket = group_buckets(user_sums, response_sums, counts, num_buckets, seed)
    return group_bucket[groups.of_row].astype(np.int32)


def _rows(
    spool: _Spool, groups: _Groups, bucket: np.ndarray, row_text: np.ndarray, vectors: _VectorFile, target: pa.Schema
) -> pa.RecordBatchReader:
    """Pass 4's input: the spooled rows with their group, bucket and vector, in the table's schema."""
    keys = pa.array(groups.keys, pa.string())

    def batches() -> Iterator[pa.RecordBatch]:
        at = 0
        for batch in spool.batches(rows=batch_rows(_dim(vectors))):
            release()
            m = len(batch)
            vecs = vectors.read(row_text[at : at + m])
            columns = {name: batch.column(name) for name in _SPOOL.names}
            columns |= {
                "group": keys.take(pa.array(groups.of_row[at : at + m])),
                "bucket": pa.array(bucket[at : at + m], pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1]),
            }
            yield pa.record_batch([columns[f.name] for f in target], schema=target)
            at += m

    return pa.RecordBatchReader.from_batches(target, batches())


def _unchanged(db: Path, table: str, key: str) -> BuildResult | None:
    """The latest version of ``table`` when it was built from exactly this content, else None."""
    conn = connect(db)
    if table not in conn.list_tables().tables:
        return None
    tbl = conn.open_table(table)
    if (tbl.schema.metadata or {}).get(b"content", b"").decode() != key:
        return None
    # A build killed between writing the rows and indexing them left a version without its indices:
    # build again rather than reuse it.
    if not indexed(tbl):
        return None
    counts = Counter(read_columns(tbl, ["bucket"]).column("bucket").to_pylist())
    return BuildResult(str(db), table, int(tbl.version), sum(counts.values()), 0, dict(sorted(counts.items())), reused=True)
