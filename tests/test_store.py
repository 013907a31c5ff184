import numpy as np

from conversations.records import load_records
from retrieval.encoder import embed
from retrieval.store import build_table, hybrid_search, open_table, stats


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


def test_hybrid_search_finds_the_matching_row_first_and_prefilters_buckets(tmp_path, tiny_jsonl, capfd):
    pairs, _ = load_records(tiny_jsonl)
    res = build_table(pairs, tmp_path / "db", "conversations")
    tbl = open_table(tmp_path / "db", "conversations", res.version)
    q = "how long do I boil an egg"
    capfd.readouterr()
    rows = hybrid_search(tbl, embed([q])[0], q, k=5)
    assert capfd.readouterr().err == ""  # LanceDB's per-search deprecation warning stays quiet
    assert rows[0]["user"] == "How long do I boil an egg?"
    assert rows[0]["cosine"] > 0.9
    other = [b for b in range(4) if b != rows[0]["bucket"]]
    filtered = hybrid_search(tbl, embed([q])[0], q, k=5, buckets=other)
    assert filtered and all(r["bucket"] in other for r in filtered)


def test_open_table_names_the_fix_when_missing(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="bucketchat db build"):
        open_table(tmp_path / "empty", "conversations")


def test_embeddings_are_unit_length_and_paraphrases_close():
    v = embed(["reset my password", "I forgot my password", "how long to boil an egg"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
