import math

import numpy as np
import pytest

from conversations.records import load_records
from retrieval.build import build_table
from retrieval.encoder import embed
from retrieval.index_files import index_from_arrays, open_index
from retrieval.search import BM25_B, BM25_K1, IVF_MIN_ROWS, RRF_K, SearchIndex
from retrieval.store import hybrid_search, open_table


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(vectors, users=None, buckets=None) -> SearchIndex:
    n = len(vectors)
    users = users or [f"row {i}" for i in range(n)]
    buckets = np.zeros(n, np.int64) if buckets is None else np.asarray(buckets)
    return index_from_arrays(vectors, users, buckets, {"id": [str(i) for i in range(n)], "user": users})


def test_bm25_matches_the_formula_by_hand():
    users = ["reset my password", "password password help", "boil an egg"]
    idx = _index(_unit(np.eye(3, 8)), users)
    # "my" and "an" are stop words: lengths 2, 3, 2 (avg 7/3); "password" in 2 of 3 rows.
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    avg = 7 / 3

    def term(tf, length):
        return idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * length / avg))

    scores = idx.bm25("Password?")
    by_id = dict(zip(idx.payload["id"], scores))
    assert by_id["0"] == pytest.approx(term(1, 2), rel=1e-5)
    assert by_id["1"] == pytest.approx(term(2, 3), rel=1e-5)
    assert by_id["2"] == 0.0
    assert not idx.bm25("the of and").any()  # only stop words: no lexical evidence
    assert idx.bm25("not")[0] == 0.0 and "not" not in idx.vocab  # negations are kept as terms, just absent here


def test_small_tables_scan_exactly_and_prefilter_buckets():
    rng = np.random.default_rng(0)
    vecs = _unit(rng.normal(size=(600, 16)))
    buckets = rng.integers(0, 5, 600)
    idx = _index(vecs, buckets=buckets)
    assert len(idx.centroids) == 1  # below IVF_MIN_ROWS: one cell, an exact scan
    q = vecs[17]
    rows = idx.search(q, "", k=10)
    exact = np.argsort(-(vecs @ q))[:10]
    assert [int(r["id"]) for r in rows] == exact.tolist()
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    only = idx.search(q, "", k=10, buckets=[1, 3])
    allowed = np.flatnonzero(np.isin(buckets, [1, 3]))
    assert [int(r["id"]) for r in only] == allowed[np.argsort(-(vecs[allowed] @ q))[:10]].tolist()
    assert idx.search(q, "", k=10, buckets=[99]) == []  # a bucket the table does not have


def test_inverted_file_recall_and_a_rare_bucket_is_never_lost():
    # 25k rows around 200 topics (real sentence vectors cluster too), above the exact-scan limit.
    rng = np.random.default_rng(1)
    topics = _unit(rng.normal(size=(200, 32)))
    n = IVF_MIN_ROWS + 5000
    vecs = _unit(topics[rng.integers(0, 200, n)] + 0.35 * rng.normal(size=(n, 32)) / np.sqrt(32))
    buckets = np.where(np.arange(n) < 5, 9, rng.integers(0, 9, n))  # bucket 9: five rows, anywhere
    idx = _index(vecs, buckets=buckets)
    assert len(idx.centroids) == round(math.sqrt(n)) and idx.nprobe < len(idx.centroids)
    queries = _unit(topics[:50] + 0.35 * rng.normal(size=(50, 32)) / np.sqrt(32))
    recall = [len({int(r["id"]) for r in idx.search(q, "", k=10)} & set(np.argsort(-(vecs @ q))[:10].tolist())) / 10 for q in queries]
    assert np.mean(recall) >= 0.95
    # A filter that leaves fewer rows near the query than k widens the probe until all are found.
    assert sorted(int(r["id"]) for r in idx.search(queries[0], "", k=10, buckets=[9])) == [0, 1, 2, 3, 4]
    again = _index(vecs, buckets=buckets)  # seeded: every process builds the same index
    assert np.array_equal(again.centroids, idx.centroids)


def test_a_turns_one_probe_gives_what_each_search_scanning_alone_gives():
    """Chat scans the nearest cells once per turn (``probe``) for the vote and the search; every
    result must be the one the search would find on its own, with or without a bucket filter, and
    when the filter leaves too few rows in those cells (bucket 9: five rows anywhere) and it widens."""
    rng = np.random.default_rng(2)
    topics = _unit(rng.normal(size=(100, 16)))
    n = IVF_MIN_ROWS + 2000
    vecs = _unit(topics[rng.integers(0, 100, n)] + 0.4 * rng.normal(size=(n, 16)) / 4)
    buckets = np.where(np.arange(n) < 5, 9, rng.integers(0, 9, n))
    words = ["card", "refund", "parcel", "password", "limit"]
    users = [" ".join(rng.choice(words, 2)) for _ in range(n)]
    idx = _index(vecs, users, buckets)
    assert idx.nprobe < len(idx.centroids)
    for q in _unit(topics[:20] + 0.4 * rng.normal(size=(20, 16)) / 4):
        probe = idx.probe(q)
        assert len(probe.positions) == sum(b - a for a, b in (idx.cell_span[c] for c in probe.by_cell[: idx.nprobe]))
        for k in (1, 10):
            alone, shared = idx.nearest(q, k), idx.nearest(q, k, probe)
            assert alone[1].tolist() == shared[1].tolist()
            np.testing.assert_array_equal(alone[0], shared[0])
        for pool in (None, [1, 3], [9]):
            assert idx.search(q, "card refund", 10, pool, probe=probe) == idx.search(q, "card refund", 10, pool)
        assert sorted(int(r["id"]) for r in idx.search(q, "", 10, [9], probe=probe)) == [0, 1, 2, 3, 4]


def test_rank_fusion_puts_rows_both_legs_agree_on_first():
    vecs = _unit(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32))
    users = ["card arrived broken", "parcel delayed", "refund my card fee", "exchange rate"]
    idx = _index(vecs, users)
    rows = idx.search(vecs[0], "broken card", k=3)
    # Vector leg 0, 1, 2 (2 and 3 tie at cosine 0: the earlier row first); text leg 0, 2 (only
    # row 2 shares "card"). Row 2 is third by vector and second by text: 1/63 + 1/62 beats row 1's 1/62.
    assert [r["id"] for r in rows] == ["0", "2", "1"]
    assert [r["score"] for r in rows] == pytest.approx([2 / (RRF_K + 1), 1 / (RRF_K + 3) + 1 / (RRF_K + 2), 1 / (RRF_K + 2)], abs=1e-6)
    with pytest.raises(ValueError, match="k must be at least 1"):
        idx.search(vecs[0], "card", k=0)


def test_a_table_versions_index_answers_like_lancedb_hybrid_search(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    res = build_table(pairs, tmp_path / "db", "conversations")
    tbl = open_table(tmp_path / "db", "conversations", res.version)
    idx, _ = open_index(tmp_path / "db", "conversations", res.version)
    assert idx.stats.rows == 26
    for q in ("how long do I boil an egg", "where is my order", "I forgot my password", "undo my last commit"):
        vec = embed([q])[0]
        mine, lance = idx.search(vec, q, k=5), hybrid_search(tbl, vec, q, k=5)
        assert mine[0]["user"] == lance[0]["user"]
        assert mine[0]["cosine"] == pytest.approx(lance[0]["cosine"], abs=1e-5)
        assert set(mine[0]) >= {"id", "user", "assistant", "bucket", "group", "source", "cosine"}
