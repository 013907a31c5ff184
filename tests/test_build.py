import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conversations.records import load_records
from models.processes import process_start
from retrieval.build import build_table
from retrieval.embedding_cache import EmbeddingCache
from retrieval.encoder import ENCODER_ID, embed
from retrieval.locations import BUILD_DIR
from retrieval.store import CACHE_DIR, open_table, stats

ROOT = Path(__file__).resolve().parents[1]


def test_build_writes_versioned_table_with_fts_and_bucket_index(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    result = build_table(pairs, tmp_path / "db", "conversations")
    assert result.rows == 26 and result.table == "conversations"
    # 4 intents -> buckets in sorted label order (boil_egg, reset_password, track_order, undo_commit);
    # the two multi-turn pairs inherit the labels of their responses (boil_egg, track_order).
    assert result.buckets == {0: 7, 1: 6, 2: 7, 3: 6}
    s = stats(tmp_path / "db", "conversations")
    assert s["rows"] == 26 and s["version"] == result.version
    assert {i["type"] for i in s["indices"]} == {"FTS", "Bitmap"}
    assert all(i["unindexed_rows"] == 0 for i in s["indices"])
    assert s["sources"] == {"tiny": 26}
    tbl = open_table(tmp_path / "db", "conversations", result.version)
    cols = tbl.schema.names
    assert cols == ["id", "user", "context", "assistant", "label", "group", "bucket", "source", "parent_id", "op", "vector"]


def test_rebuild_embeds_only_new_text_and_keeps_pinned_version(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    first = build_table(pairs, tmp_path / "db", "conversations")
    assert first.embedded == 26
    second = build_table(pairs[:10], tmp_path / "db", "conversations")
    assert second.embedded == 0
    assert second.version > first.version
    assert open_table(tmp_path / "db", "conversations", first.version).count_rows() == 26
    assert open_table(tmp_path / "db", "conversations").count_rows() == 10


def test_a_build_reads_its_pairs_once_and_writes_each_row_with_its_own_vector_group_and_bucket(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    pairs = pairs + pairs[:3]  # repeated messages: one vector each, however many rows
    result = build_table(iter(pairs), tmp_path / "db", "conversations")  # an iterator: read once
    assert result.rows == 29 and result.embedded == 26
    rows = open_table(tmp_path / "db", "conversations", result.version).to_arrow().to_pylist()
    assert [r["id"] for r in rows] == [p.id for p in pairs]  # the input's order
    vectors = embed([p.user for p in pairs])
    np.testing.assert_allclose(np.array([r["vector"] for r in rows]), vectors, atol=1e-6)
    by_label = {}
    for r, p in zip(rows, pairs):
        assert r["user"] == p.user and r["assistant"] == p.assistant and r["label"] == p.label
        by_label.setdefault(r["group"], set()).add(r["bucket"])
    assert all(len(b) == 1 for b in by_label.values())  # a group is never split between buckets
    assert not list((tmp_path / "db" / BUILD_DIR).iterdir())  # the spool and vector file are gone


def test_unlabelled_groups_are_bucketed_by_their_responses(tmp_path):
    from conversations.records import Pair

    # No labels: rows are grouped by response, so the four askings of each response share a bucket.
    pairs = [
        Pair(user=f"{q} {i}", assistant=a, source="t", line=n)
        for n, (i, (q, a)) in enumerate(
            (i, qa)
            for i in range(4)
            for qa in [
                ("reset my password", "Use the reset link."),
                ("where is my parcel", "Track it here."),
                ("boil an egg", "Seven minutes."),
            ]
            * 4
        )
    ]
    result = build_table(pairs, tmp_path / "db", "t", num_buckets=2)
    rows = open_table(tmp_path / "db", "t", result.version).to_arrow().to_pylist()
    groups = {r["group"] for r in rows}
    assert groups == {"response:use the reset link.", "response:track it here.", "response:seven minutes."}
    assert all(len({r["bucket"] for r in rows if r["group"] == g}) == 1 for g in groups)
    assert result.embedded == 4 * 3 + 3  # every distinct message, and each response once


def test_a_build_folder_left_by_a_dead_process_is_cleared_and_a_live_ones_is_kept(tmp_path, tiny_jsonl):
    builds = tmp_path / "db" / BUILD_DIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = builds / f"{dead}-12345-abcd"
    alive = builds / f"{os.getpid()}-{process_start(os.getpid())}-abcd"
    for folder in (stale, alive):
        folder.mkdir(parents=True)
        (folder / "vectors.npy").write_bytes(b"x" * 100)
    build_table(load_records(tiny_jsonl)[0], tmp_path / "db", "conversations")
    assert not stale.exists() and alive.exists()


def test_vectors_embedded_before_an_error_are_kept_in_the_cache(tmp_path):
    cache = EmbeddingCache(tmp_path, ENCODER_ID)
    with pytest.raises(KeyboardInterrupt), cache.writer() as out:
        out.add(["one", "two"], np.eye(2, 384, dtype=np.float32))
        raise KeyboardInterrupt
    assert len(EmbeddingCache(tmp_path, ENCODER_ID)) == 2


def _peak_mb(tmp_path: Path, rows: int, dim: int) -> float:
    """Peak resident memory of `bucketchat db build` over ``rows`` rows whose ``dim``-d vectors are
    already in the embedding cache, read from the process's own VmHWM (ru_maxrss would carry over
    the parent's peak through fork)."""
    folder = tmp_path / str(rows)
    folder.mkdir()
    records = [{"user": f"question {i} about topic {i % 50}", "assistant": f"answer {i % 50}", "label": f"t{i % 50}"} for i in range(rows)]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    vectors = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with EmbeddingCache(folder / "db" / CACHE_DIR, ENCODER_ID).writer() as out:
        out.add([r["user"] for r in records], vectors)
    del vectors
    code = (
        "import re, sys; from pathlib import Path; from interfaces.cli import main; "
        f"rc = main(['db', 'build', '--data', {str(folder / 'd.jsonl')!r}, '--db', {str(folder / 'db')!r}]); "
        "print('HWM', re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)); sys.exit(rc)"
    )
    env = {**os.environ, "BUCKETCHAT_HOME": str(folder / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stats(folder / "db", "conversations")["rows"] == rows
    return int(done.stdout.split("HWM")[-1]) / 1024


@pytest.mark.slow
def test_a_builds_peak_memory_does_not_grow_with_its_vectors(tmp_path):
    """Vectors of 8,192 dimensions (32 KB a row) written straight into the embedding cache, so what
    a row costs is its vector: the larger table has 375 MB more of them, and a build that held
    them all even once would grow by that much. The margin is half of it: one build's peak moves by
    up to ~100 MB from run to run (LanceDB's and Arrow's threads), more beside the rest of the suite.
    Both sizes stay under the 20k rows where vector indices start, so only the rows change."""
    small, large = _peak_mb(tmp_path, 4_000, 8192), _peak_mb(tmp_path, 16_000, 8192)
    extra_vectors_mb = 12_000 * 8192 * 4 / 2**20
    print(f"peak {small:.0f} MB at 4k rows, {large:.0f} MB at 16k; their vectors differ by {extra_vectors_mb:.0f} MB")
    assert large - small < extra_vectors_mb / 2, f"peak {small:.0f} MB at 4k rows, {large:.0f} MB at 16k"
