import json
import os
import shutil
import subprocess
import sys

import numpy as np

from conversations.records import load_records
from retrieval.index_files import Coded, Strings, index_dir, load_index, open_index, save_index
from retrieval.search import IVF_MIN_ROWS, SearchIndex
from retrieval.store import build_table
from tests.conftest import write_jsonl


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_a_saved_index_searches_exactly_as_the_one_it_was_saved_from(tmp_path):
    rng = np.random.default_rng(0)
    n = IVF_MIN_ROWS + 500  # inverted-file cells, not just one exact scan
    vecs = _unit(rng.normal(size=(n, 8)))
    words = ["card", "refund", "parcel", "password", "café", "not", "the"]
    users = [" ".join(rng.choice(words, 3)) for _ in range(n)]
    buckets = rng.integers(0, 10, n)
    sources = [None if i % 7 == 0 else f"src-{i % 3}\udcff" for i in range(n)]  # nulls and an undecodable byte
    payload = {"id": [str(i) for i in range(n)], "user": users, "assistant": [f"answer {i % 40}" for i in range(n)], "source": sources}
    built = SearchIndex(vecs, users, buckets, payload)
    save_index(built, tmp_path / "ix", {"table": "t", "version": 1})
    loaded, about = load_index(tmp_path / "ix")
    assert about["rows"] == n and about["version"] == 1 and about["columns"] == ["id", "user", "assistant", "source"]
    assert (
        isinstance(loaded.vectors.base, np.memmap)
        and isinstance(loaded.payload["user"], Strings)
        and isinstance(loaded.payload["assistant"], Coded)
    )
    assert loaded.vocab == built.vocab and loaded.nprobe == built.nprobe and len(loaded.centroids) > 1
    for name, column in built.payload.items():
        assert list(loaded.payload[name]) == column, name
    for i in (0, 1, 5000, n - 1):
        text = users[i] + " not"
        assert loaded.search(vecs[i], text, k=10) == built.search(vecs[i], text, k=10)
        assert loaded.search(vecs[i], text, k=10, buckets=[2, 3]) == built.search(vecs[i], text, k=10, buckets=[2, 3])
        np.testing.assert_array_equal(loaded.nearest(vecs[i], 5)[1], built.nearest(vecs[i], 5)[1])


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
