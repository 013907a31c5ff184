import json
import os
import shutil
import subprocess
import sys

import numpy as np

from conversations.records import load_records
from retrieval.build import build_table
from retrieval.index_build import ArrayRows, write_index
from retrieval.index_files import Coded, Strings, index_dir, index_from_arrays, load_index, open_index
from retrieval.search import BM25_B, BM25_K1, IVF_MIN_ROWS, PROBES
from retrieval.store import open_table
from tests.conftest import write_jsonl


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference_bm25(users: list[str], query: str) -> np.ndarray:
    """BM25 per row (table order) from scikit-learn's CountVectorizer: what the index's term
    counting must reproduce."""
    from sklearn.feature_extraction.text import CountVectorizer

    from retrieval.index_build import stop_words

    tf = CountVectorizer(token_pattern=r"(?u)\w+", stop_words=sorted(stop_words())).fit(users)
    counts = tf.transform(users).toarray().astype(np.float64)
    lengths, df = counts.sum(1), (counts > 0).sum(0)
    idf = np.log(1 + (len(users) - df + 0.5) / (df + 0.5))
    norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths[:, None] / lengths.mean())
    scores = idf * counts * (BM25_K1 + 1) / (counts + norm)
    terms = [tf.vocabulary_[t] for t in set(query.lower().split()) if t in tf.vocabulary_]
    return scores[:, terms].sum(1)


def test_an_index_built_in_batches_lays_out_every_row_and_scores_bm25_exactly(tmp_path):
    rng = np.random.default_rng(0)
    n = IVF_MIN_ROWS + 500  # inverted-file cells, and more than one batch of rows
    vecs = _unit(rng.normal(size=(n, 8)))
    words = ["card", "refund", "parcel", "password", "café", "not", "the"]
    users = [" ".join(rng.choice(words, 3)) for _ in range(n)]
    buckets = rng.integers(0, 10, n)
    sources = [None if i % 7 == 0 else f"src-{i % 3}\udcff" for i in range(n)]  # nulls and an undecodable byte
    payload = {"id": [str(i) for i in range(n)], "user": users, "assistant": [f"answer {i % 40}" for i in range(n)], "source": sources}
    write_index(ArrayRows(vecs, users, buckets, payload), tmp_path / "ix", {"table": "t", "version": 1})
    index, about = load_index(tmp_path / "ix")
    assert about["rows"] == n and about["version"] == 1 and about["columns"] == ["id", "user", "assistant", "source"]
    assert isinstance(index.vectors.base, np.memmap) and isinstance(index.payload["user"], Strings)
    assert isinstance(index.payload["assistant"], Coded) and len(index.payload["assistant"].values) == 40
    # Every row at its sorted position, with its own vector, bucket and payload.
    rows = np.asarray(index.rows)
    assert sorted(rows.tolist()) == list(range(n))
    np.testing.assert_array_equal(index.vectors, vecs[rows])
    np.testing.assert_array_equal(index.buckets, buckets[rows])
    for name, column in payload.items():
        assert list(index.payload[name]) == [column[r] for r in rows], name
    # Each (cell, bucket) slice holds that cell's rows of that bucket, and the cells cover every row.
    cells = len(index.centroids)
    assert cells == round(np.sqrt(n)) and index.slices[0][0] == 0 and index.slices[-1][-1] == n
    for c in (0, cells // 2, cells - 1):
        for b in range(10):
            lo, hi = index.slices[c][b], index.slices[c][b + 1]
            assert set(np.asarray(index.buckets[lo:hi]).tolist()) <= {b}
            assert (np.argmax(index.vectors[lo:hi] @ index.centroids.T, axis=1) == c).all()
    for query in ("card not", "café refund", "the"):
        np.testing.assert_allclose(index.bm25(query)[np.argsort(rows)], _reference_bm25(users, query), rtol=1e-5, atol=1e-6)
    assert index.nearest(vecs[5], 1)[1].tolist() == [int(np.flatnonzero(rows == 5)[0])]


def test_an_index_saved_with_its_probe_count_opens_with_todays(tmp_path):
    """Indexes built before the probe count was a search setting hold an nprobe.npy (30 cells at 1M
    rows); they open as they are and probe ``PROBES`` cells, without being built again."""
    rng = np.random.default_rng(0)
    n = IVF_MIN_ROWS + 100
    vecs = _unit(rng.normal(size=(n, 8)))
    users = [f"row {i}" for i in range(n)]
    write_index(ArrayRows(vecs, users, np.zeros(n, np.int64), {"id": [str(i) for i in range(n)]}), tmp_path / "ix", {})
    assert not (tmp_path / "ix" / "nprobe.npy").exists()
    np.save(tmp_path / "ix" / "nprobe.npy", np.asarray([30]))
    index, _ = load_index(tmp_path / "ix")
    assert len(index.centroids) == round(np.sqrt(n)) and index.nprobe == PROBES == 10


def test_an_index_built_from_a_table_equals_one_built_from_its_rows_in_memory(tmp_path):
    res = _table(
        tmp_path,
        [{"user": f"question {i} about {w}", "assistant": f"answer {i % 3}"} for i, w in enumerate(["cards", "refunds", "parcels"] * 4)],
    )
    from_table, _ = open_index(tmp_path / "db", "conversations", res.version)
    data = open_table(tmp_path / "db", "conversations", res.version).to_arrow()
    payload = {c: data[c].to_pylist() for c in ("id", "user", "assistant", "group", "source")}
    vecs = np.stack(data["vector"].to_numpy(zero_copy_only=False))
    in_memory = index_from_arrays(vecs, payload["user"], data["bucket"].to_numpy(), payload)
    for name, array in from_table.parts().items():
        np.testing.assert_array_equal(np.asarray(array), np.asarray(in_memory.parts()[name]), err_msg=name)
    assert from_table.vocab == in_memory.vocab
    for name in payload:
        assert list(from_table.payload[name]) == list(in_memory.payload[name]), name


def _table(folder, records):
    pairs, _ = load_records(write_jsonl(folder / "d.jsonl", records))
    return build_table(pairs, folder / "db", "conversations")


RECORDS = [{"user": f"question number {i}", "assistant": f"answer {i % 3}"} for i in range(12)]


def test_an_index_is_built_once_per_version_then_opened(tmp_path):
    res = _table(tmp_path, RECORDS)
    folder = index_dir(tmp_path / "db", "conversations", res.version)
    assert not folder.exists()  # the store alone does not index: the db build task or first use does
    index, about = open_index(tmp_path / "db", "conversations", res.version)
    assert about["rows"] == 12 and about["encoder"] and about["fingerprint"].startswith("manifest:")
    stamp = (folder / "index.json").stat().st_mtime_ns
    again, _ = open_index(tmp_path / "db", "conversations", res.version)
    assert (folder / "index.json").stat().st_mtime_ns == stamp  # opened, not rebuilt
    assert list(again.payload["user"]) == list(index.payload["user"])


def test_a_table_rebuilt_to_the_same_version_number_is_indexed_again(tmp_path):
    first = _table(tmp_path, RECORDS)
    open_index(tmp_path / "db", "conversations", first.version)
    index_folder = tmp_path / "db" / "_search_index"
    kept = tmp_path / "kept"
    shutil.move(index_folder, kept)  # the user deletes the table but not the side files
    shutil.rmtree(tmp_path / "db")
    other = [{"user": f"another text {i}", "assistant": "another answer"} for i in range(5)]
    second = _table(tmp_path, other)
    assert second.version == first.version
    shutil.move(kept, index_folder)
    index, about = open_index(tmp_path / "db", "conversations", second.version)
    assert about["rows"] == 5 and list(index.payload["assistant"]) == ["another answer"] * 5


def test_a_build_killed_while_writing_the_index_leaves_none_and_the_next_use_builds_it(tmp_path):
    res = _table(tmp_path, RECORDS)
    code = f"from retrieval.index_files import open_index; open_index({str(tmp_path / 'db')!r}, 'conversations', {res.version})"
    env = {**os.environ, "BUCKETCHAT_FAILPOINT": "index:written"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9
    folder = index_dir(tmp_path / "db", "conversations", res.version)
    assert not folder.exists()
    index, about = open_index(tmp_path / "db", "conversations", res.version)
    assert about["rows"] == 12 and json.loads((folder / "index.json").read_text())["version"] == res.version
