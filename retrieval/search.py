"""Hybrid search of one pinned table version: BM25 over the user messages + vector similarity,
fused by reciprocal rank (RRF), as LanceDB's hybrid search does.

Why not LanceDB's own hybrid query on every chat turn: its planning and execution cost several times
the whole turn budget at 100k rows, while the arithmetic itself is well under a millisecond
(BENCHMARKS.md, "Why the hand-written pieces stay"). A pinned version never changes, so its index is
built once beside it (retrieval/index_build.py) and opened memory-mapped (retrieval/index_files.py);
LanceDB stays the store of record (building, versions, `/why`).

Vectors: an exact scan below ``IVF_MIN_ROWS``; above it an inverted-file index (k-means cells over the
unit vectors, ~sqrt(N) of them) and a scan of the ``PROBES`` nearest cells, so a query reads
~PROBES * sqrt(N) rows: the vector legs grow as the square root of the table, not with it. Rows are stored sorted
by (cell, bucket), so a cell's rows of one bucket are a contiguous slice: the bucket prefilter is a
choice of slices, not a scan, and the probe widens to more cells until it has k rows of the allowed
buckets.

BM25 (k1 1.2, b 0.75) over lower-cased word tokens without English stop words, as a sparse
term x row matrix of precomputed per-posting scores; a query sums its terms' rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Below this an exact scan is ~1.5 ms (20k x 384): no index to build.
IVF_MIN_ROWS = 20_000
# Cells a query scans, nearest first. A share of the cells (3 %, the rule before) made every query
# read 3 % of the table; a fixed count reads ~PROBES * sqrt(N) rows, for a little less recall at 1M
# rows (tests/bench/search.py; BENCHMARKS.md, "A large table"). At 100k, 10 is what the share gave. A
# search-time setting: indexes built before it was one get it without being built again.
PROBES = 10
RRF_K = 60  # LanceDB's RRFReranker default
BM25_K1, BM25_B = 1.2, 0.75
COLUMNS = ["id", "user", "assistant", "bucket", "group", "source"]

_TERM = re.compile(r"(?u)\w+")


def query_terms(text: str) -> list[str]:
    """A query's BM25 terms: lower-cased word tokens, as the index read its rows. Stop
    words are not removed here: they are not in the vocabulary, so they match nothing."""
    return _TERM.findall(text.lower())


@dataclass(frozen=True)
class IndexStats:
    rows: int
    cells: int
    nprobe: int
    terms: int
    build_s: float
    bytes: int


@dataclass(frozen=True)
class Probe:
    """The rows of the cells nearest one query vector (``SearchIndex.probe``) and their cosines."""

    by_cell: list[int]  # every cell, nearest first
    positions: np.ndarray  # sorted positions of the scanned rows
    sims: np.ndarray  # their cosines to the query


def _best(pos: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` of ``pos`` with the highest ``sims``, best first (ties: the lower position)."""
    top = np.argpartition(-sims, k - 1)[:k] if len(sims) > k else np.arange(len(sims))
    return pos[top][np.lexsort((pos[top], -sims[top]))]


class SearchIndex:
    """``index.search(vec, text, k, buckets)`` -> rows, from the arrays of a built index
    (``from_parts``; retrieval/index_files.py opens one, retrieval/index_build.py builds one).

    ``vectors`` (N, D) unit float32 and ``buckets`` (N,) in sorted order; ``rows`` maps a sorted
    position to the row's place in the table; ``payload`` column name -> N values, read by sorted
    position. Read-only: safe to share between the server's threads.
    """

    @classmethod
    def from_parts(cls, parts: dict, payload: dict, vocab: dict[str, int], build_s: float = 0.0) -> SearchIndex:
        """An index from the arrays ``parts()`` returned (memory-mapped ones too) and its payload
        columns: no building, so opening a saved index costs no more at 1M rows than at 1k."""
        self = cls.__new__(cls)
        # Plain ndarray views of the maps: slicing an np.memmap runs Python code per slice, and a
        # query slices once per IVF cell it scans.
        parts = {name: a.view(np.ndarray) if isinstance(a, np.memmap) else a for name, a in parts.items()}
        self.vectors, self.buckets, self.rows, self.centroids = parts["vectors"], parts["buckets"], parts["rows"], parts["centroids"]
        self.post_indptr, self.post_rows, self.post_weights = parts["post_indptr"], parts["post_rows"], parts["post_weights"]
        self.slices = np.asarray(parts["slices"]).tolist()
        self.cell_span = [(row[0], row[-1]) for row in self.slices]
        self.num_buckets = len(self.slices[0]) - 1
        self.nprobe = min(len(self.centroids), PROBES)
        self.payload, self.vocab, self.build_s = payload, vocab, build_s
        return self

    def parts(self) -> dict:
        """The index's arrays by name (what ``from_parts`` takes back), without the payload and vocabulary."""
        return {
            "vectors": self.vectors,
            "buckets": self.buckets,
            "rows": self.rows,
            "centroids": self.centroids,
            "slices": np.asarray(self.slices, dtype=np.int64),
            "post_indptr": self.post_indptr,
            "post_rows": self.post_rows,
            "post_weights": self.post_weights,
        }

    @property
    def stats(self) -> IndexStats:
        return IndexStats(
            len(self.vectors),
            len(self.centroids),
            self.nprobe,
            len(self.vocab),
            self.build_s,
            self.vectors.nbytes + self.post_weights.nbytes + self.post_rows.nbytes,
        )

    def bm25(self, text: str) -> np.ndarray:
        """(N,) BM25 score of every row (sorted order) for ``text``; 0 where no term matches."""
        ids = sorted({self.vocab[t] for t in query_terms(text) if t in self.vocab})
        n = len(self.buckets)
        if not ids:
            return np.zeros(n)
        parts = [slice(self.post_indptr[j], self.post_indptr[j + 1]) for j in ids]
        docs = np.concatenate([self.post_rows[s] for s in parts])
        weights = np.concatenate([self.post_weights[s] for s in parts])
        return np.bincount(docs, weights=weights, minlength=n)

    def probe(self, vector: np.ndarray) -> Probe:
        """Scan the ``nprobe`` cells nearest ``vector`` once: a turn's neighbour vote and its search
        then both read this (``probe=``) instead of scanning the same cells twice."""
        vector = np.asarray(vector, dtype=np.float32)
        by_cell = self._cells_by_distance(vector)
        spans = [(a, b) for a, b in (self.cell_span[c] for c in by_cell[: self.nprobe]) if b > a]
        if not spans:
            return Probe(by_cell, np.zeros(0, np.int64), np.zeros(0, np.float32))
        positions = np.concatenate([np.arange(a, b) for a, b in spans])
        return Probe(by_cell, positions, np.concatenate([self.vectors[a:b] @ vector for a, b in spans]))

    def _in_buckets(self, positions: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Which of ``positions`` hold rows of the ``allowed`` buckets (a lookup per row, not a pass over all)."""
        keep = np.zeros(self.num_buckets, bool)
        keep[allowed] = True
        return keep[self.buckets[positions]]

    def _cells_by_distance(self, vec: np.ndarray) -> list[int]:
        return np.argsort(-(self.centroids @ vec)).tolist() if len(self.centroids) > 1 else [0]

    def _vector_top(self, vec: np.ndarray, k: int, allowed: np.ndarray | None, probe: Probe | None = None) -> np.ndarray:
        """Sorted positions of the ``k`` rows nearest ``vec`` (in the allowed buckets), best first."""
        if probe is not None:
            pos, sims = probe.positions, probe.sims
            if allowed is not None:
                rows = self._in_buckets(pos, allowed)
                pos, sims = pos[rows], sims[rows]
            if len(pos) >= k or self.nprobe >= len(self.centroids):
                return _best(pos, sims, k)
            return self._scan(vec, k, allowed, probe.by_cell, self.nprobe * 2)  # too few rows nearby: widen
        return self._scan(vec, k, allowed, self._cells_by_distance(vec), self.nprobe)

    def _scan(self, vec: np.ndarray, k: int, allowed: np.ndarray | None, by_cell: list[int], nprobe: int) -> np.ndarray:
        """``_vector_top`` by scanning the nearest ``nprobe`` cells (only the allowed buckets' slices
        of them), doubling them until they hold ``k`` rows or are all the cells."""
        cells = len(self.centroids)
        nprobe = min(cells, nprobe)
        while True:
            if allowed is None:
                spans = [self.cell_span[c] for c in by_cell[:nprobe]]
            else:
                spans = [(self.slices[c][b], self.slices[c][b + 1]) for c in by_cell[:nprobe] for b in allowed]
            spans = [(a, b) for a, b in spans if b > a]
            found = sum(b - a for a, b in spans)
            if found >= k or nprobe >= cells:
                break
            nprobe = min(cells, nprobe * 2)
        if not spans:
            return np.zeros(0, np.int64)
        pos = np.concatenate([np.arange(a, b) for a, b in spans])
        return _best(pos, np.concatenate([self.vectors[a:b] @ vec for a, b in spans]), k)

    def nearest(self, vector: np.ndarray, k: int, probe: Probe | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosines (k',), row positions (k',)) of the ``k`` rows nearest ``vector``, best first:
        the neighbour vote's rows (retrieval/neighbours.py). Positions index ``payload`` and ``buckets``."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vector = np.asarray(vector, dtype=np.float32)
        pos = self._vector_top(vector, k, None, probe)
        return self.vectors[pos] @ vector, pos

    def _text_top(self, text: str, k: int, allowed: np.ndarray | None) -> np.ndarray:
        scores = self.bm25(text)
        hits = np.flatnonzero(scores > 0)
        if allowed is not None:
            # Only the rows a term matched are looked up: masking every row's bucket cost more than
            # the scoring itself at 1M rows.
            hits = hits[self._in_buckets(hits, allowed)]
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        return hits[np.lexsort((hits, -scores[hits]))]

    def search(self, vector: np.ndarray, text: str, k: int, buckets: list[int] | None = None, probe: Probe | None = None) -> list[dict]:
        """Top ``k`` rows by RRF of the BM25 and vector rankings (each leg's top ``k``), as dicts of
        the payload columns plus ``bucket`` and ``cosine`` (the row's vector against ``vector``);
        ``probe``: ``probe(vector)``'s scan, when the turn has one already."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vector = np.asarray(vector, dtype=np.float32)
        allowed = None if buckets is None else np.asarray(sorted({int(b) for b in buckets if 0 <= int(b) < self.num_buckets}), np.int64)
        if allowed is not None and len(allowed) == 0:
            return []
        dense = self._vector_top(vector, k, allowed, probe)
        lexical = self._text_top(text, k, allowed) if text.strip() else np.zeros(0, np.int64)
        fused: dict[int, float] = {}
        for ranking in (dense, lexical):
            for rank, i in enumerate(ranking.tolist()):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        cos = self.vectors[best] @ vector if best else np.zeros(0, np.float32)
        return [
            {
                **{name: col[i] for name, col in self.payload.items()},
                "bucket": int(self.buckets[i]),
                "cosine": float(c),
                "score": round(fused[i], 6),
            }
            for i, c in zip(best, cos)
        ]
