"""Vectors by content hash, so a row is embedded once whatever table version or build asks for it.

Stored as append-only Parquet shards in the table's ``_embedding_cache/``: each build adds one shard
with only the vectors it computed, written atomically, so the cache never holds a partial vector.

Memory: each shard's vectors are one float32 array, filled a batch of rows at a time (no Python
object per number), and each key maps to a (shard, row) pair; at 1M cached rows that is the vectors
themselves plus ~150 MB of keys. Converting the column through Python lists, as this did before,
held ~14x the vectors' size (22.6 GB at 1M rows; BENCHMARKS.md).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from models.memory import batch_rows, release
from retrieval.encoder import DIM, ENCODER_ID, embed, text_key

SHARD_BITS = 32  # a key's location: shard number << SHARD_BITS | row
BATCH_ROWS = 16_384  # rows decoded at a time when a shard is read
SHARD_ROWS = 65_536  # vectors per shard a streaming build writes: a killed build loses at most these


def key_hashes(keys) -> np.ndarray:
    """Each cache key's first 64 bits as an unsigned integer: what a streaming build matches on
    (8 bytes a text instead of a Python string; a collision among 10M keys has odds of ~3e-6)."""
    return np.fromiter((int(k[:16], 16) for k in keys), dtype=np.uint64, count=len(keys))


def lookup(known: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``hashes`` is in ``known`` (sorted, distinct uint64) and whether it is there:
    (positions, found); a position is only meaningful where found."""
    if not len(known):
        return np.zeros(len(hashes), np.int64), np.zeros(len(hashes), bool)
    at = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
    return at, known[at] == hashes


class EmbeddingCache:
    def __init__(self, folder: str | Path, encoder_id: str = ENCODER_ID, encoder_path: str | None = None):
        self.folder = Path(folder)
        self.encoder_id, self.encoder_path = encoder_id, encoder_path
        self._shards: list[np.ndarray] = []  # (rows, dim) float32 each
        self._where: dict[str, int] = {}
        self._loaded = False

    def _add_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        base = len(self._shards) << SHARD_BITS
        self._shards.append(vectors)
        self._where.update((k, base | i) for i, k in enumerate(keys))

    def _load(self) -> None:
        import pyarrow.parquet as pq

        for shard in sorted(self.folder.glob("*.parquet")):
            # A batch at a time into one array: reading a list column whole decodes its levels and
            # pages at once, ~6x the vectors' size at its peak.
            file = pq.ParquetFile(shard, pre_buffer=False, buffer_size=1 << 20)
            dim = file.schema_arrow.field("vector").type.list_size
            vectors, keys, at = np.empty((file.metadata.num_rows, dim), dtype=np.float32), [], 0
            for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=["key", "vector"]):
                vectors[at : at + len(batch)] = batch.column("vector").flatten().to_numpy().reshape(len(batch), dim)
                keys += batch.column("key").to_pylist()
                at += len(batch)
            self._add_shard(keys, vectors)
        self._loaded = True

    def _known_keys(self) -> set[str]:
        """Every cached key, read without the vectors (what a worker filling the cache needs)."""
        import pyarrow.parquet as pq

        if self._loaded:
            return set(self._where)
        return {k for shard in sorted(self.folder.glob("*.parquet")) for k in pq.read_table(shard, columns=["key"])["key"].to_pylist()}

    def known_hashes(self) -> np.ndarray:
        """Every cached key's ``key_hashes`` value, sorted and distinct, read without the vectors."""
        import pyarrow.parquet as pq

        parts = [key_hashes(pq.read_table(shard, columns=["key"])["key"].to_pylist()) for shard in sorted(self.folder.glob("*.parquet"))]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def missing(self, texts: list[str]) -> list[str]:
        """The distinct texts of ``texts`` with no cached vector, in first-seen order."""
        known = self._known_keys()
        return list(dict.fromkeys(t for t in texts if text_key(t, self.encoder_id) not in known))

    def fill(self, texts: list[str], device: str = "cpu") -> int:
        """Embed and store the texts not cached yet, without loading the cached vectors: what a
        mapped embedding task runs on a worker (tasks/database.py). Returns how many it embedded; a
        partition redone after its worker died finds its own shard there and embeds nothing."""
        todo = self.missing(texts)
        if todo:
            self._store(
                [text_key(t, self.encoder_id) for t in todo], embed(todo, device=device, path=self.encoder_path, encoder_id=self.encoder_id)
            )
        return len(todo)

    def _store(self, keys: list[str], vectors: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from models.atomic import atomic_path

        shard = pa.table({"key": keys, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{uuid.uuid4().hex}.parquet") as tmp:
            pq.write_table(shard, tmp, row_group_size=BATCH_ROWS)

    def scatter(self, wanted: np.ndarray, write) -> np.ndarray:
        """Hand every cached vector whose key hash is in ``wanted`` (sorted, distinct uint64) to
        ``write(positions in wanted, vectors)``, a batch of a shard at a time, without holding the
        cache; returns which of ``wanted`` were found."""
        import pyarrow.parquet as pq

        found = np.zeros(len(wanted), bool)
        for shard in sorted(self.folder.glob("*.parquet")):
            file = pq.ParquetFile(shard, pre_buffer=False, buffer_size=1 << 20)
            dim = file.schema_arrow.field("vector").type.list_size
            for batch in file.iter_batches(batch_size=batch_rows(dim), columns=["key", "vector"]):
                release()
                at, found_here = lookup(wanted, key_hashes(batch.column("key").to_pylist()))
                hit = np.flatnonzero(found_here)
                if len(hit):
                    vectors = batch.column("vector").flatten().to_numpy().reshape(len(batch), dim)
                    write(at[hit], vectors[hit])
                    found[at[hit]] = True
        return found

    def dim(self) -> int | None:
        """The dimension of the cached vectors, or None while the cache is empty."""
        import pyarrow.parquet as pq

        shards = sorted(self.folder.glob("*.parquet"))
        return pq.read_schema(shards[0]).field("vector").type.list_size if shards else None

    def writer(self) -> ShardWriter:
        return ShardWriter(self)

    def __len__(self) -> int:
        if not self._loaded:
            self._load()
        return len(self._where)

    def embed(self, texts: list[str], device: str = "cpu") -> tuple[np.ndarray, int]:
        """Vectors for ``texts`` (N, the encoder's dimension) and how many had to be computed."""
        if not self._loaded:
            self._load()
        keys = [text_key(t, self.encoder_id) for t in texts]
        missing = list(dict.fromkeys(k_t for k_t in zip(keys, texts) if k_t[0] not in self._where))
        if missing:
            vecs = embed([t for _, t in missing], device=device, path=self.encoder_path, encoder_id=self.encoder_id)
            new_keys = [k for k, _ in missing]
            self._store(new_keys, vecs)
            self._add_shard(new_keys, vecs)
        if not keys:
            return np.zeros((0, DIM), dtype=np.float32), 0  # no rows: no dimension to ask
        where = np.fromiter((self._where[k] for k in keys), dtype=np.int64, count=len(keys))
        shard_of, row_of = where >> SHARD_BITS, where & ((1 << SHARD_BITS) - 1)
        out = np.empty((len(keys), self._shards[int(shard_of[0])].shape[1]), dtype=np.float32)
        for s in np.unique(shard_of).tolist():
            pick = shard_of == s
            out[pick] = self._shards[s][row_of[pick]]
        return out, len(missing)


class ShardWriter:
    """Vectors a streaming build embeds, stored as they come: a shard per ``SHARD_ROWS`` (each
    written atomically), so a build killed after an hour of embedding keeps all but its last shard's
    worth. ``with cache.writer() as out: out.add(texts, vectors)``."""

    def __init__(self, cache: EmbeddingCache):
        self.cache, self.keys, self.vectors, self.held = cache, [], [], 0

    def add(self, texts: list[str], vectors: np.ndarray) -> None:
        self.keys += [text_key(t, self.cache.encoder_id) for t in texts]
        self.vectors.append(vectors)
        self.held += len(texts)
        if self.held >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.held:
            self.cache._store(self.keys, np.concatenate(self.vectors))
        self.keys, self.vectors, self.held = [], [], 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # also on an error: what was embedded is kept
