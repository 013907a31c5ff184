import numpy as np

from conversations.records import load_records
from retrieval.build import build_table
from retrieval.encoder import embed
from retrieval.store import hybrid_search, open_table


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
