"""retrieval/encoder.py: the int8 ONNX form against the torch form of the same weights, made once."""

import numpy as np
import pytest

from retrieval.embedding_cache import EmbeddingCache
from retrieval.encoder import INT8_ID, TORCH_ID, embed, int8_model_path
from tests.conftest import INTENTS

SENTENCES = [u for _, asks in INTENTS.values() for u in asks] + ["a much longer message about a card that never arrived, " * 6]


def test_int8_vectors_are_unit_length_and_close_to_fp32():
    q = embed(SENTENCES, encoder_id=INT8_ID)
    f = embed(SENTENCES, encoder_id=TORCH_ID)
    assert q.shape == f.shape == (len(SENTENCES), 384) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    cos = (q * f).sum(1)
    assert cos.min() > 0.97 and cos.mean() > 0.99


def test_int8_keeps_the_neighbours_fp32_finds():
    # each asking's nearest other asking belongs to the same intent under both forms
    q = embed(SENTENCES[:-1], encoder_id=INT8_ID)
    f = embed(SENTENCES[:-1], encoder_id=TORCH_ID)
    for v in (q, f):
        sims = v @ v.T
        np.fill_diagonal(sims, -1)
        nearest = sims.argmax(1)
        assert (nearest // 6 == np.arange(len(v)) // 6).mean() >= 0.9


def test_a_text_gets_the_same_vector_alone_or_among_others():
    # int8 activations share one scale per run: batching texts together would make a vector depend on
    # its batch-mates; each text runs alone, so the content-hash cache maps a text to one vector.
    alone = np.stack([embed([s], encoder_id=INT8_ID)[0] for s in SENTENCES])
    together = embed(SENTENCES[::-1], encoder_id=INT8_ID)[::-1]
    np.testing.assert_array_equal(alone, together)


def test_the_onnx_file_is_made_once():
    path = int8_model_path()
    stamp = path.stat().st_mtime_ns
    assert int8_model_path() == path and path.stat().st_mtime_ns == stamp and path.stat().st_size > 10_000_000


def test_cache_keys_by_encoder(tmp_path):
    cache = EmbeddingCache(tmp_path, INT8_ID)
    v1, new1 = cache.embed(["hello there", "hello there"])
    v2, new2 = EmbeddingCache(tmp_path, INT8_ID).embed(["hello there"])
    assert (new1, new2) == (1, 0) and np.array_equal(v1[0], v2[0])
    _, new3 = EmbeddingCache(tmp_path, TORCH_ID).embed(["hello there"])
    assert new3 == 1  # another encoder never reuses the int8 vector


def test_a_fine_tuned_id_needs_its_folder():
    with pytest.raises(ValueError, match="fine-tuned encoder but no folder"):
        embed(["x"], encoder_id=TORCH_ID + "+ft:0123")


def test_a_user_encoder_folder_is_checked_before_use(tmp_path, tiny_encoder):
    from retrieval.encoder import check_encoder_folder, user_encoder_id

    with pytest.raises(ValueError, match="is not a folder"):
        check_encoder_folder(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing: model\.safetensors .*; a tokenizer file"):
        check_encoder_folder(half)
    ident = user_encoder_id(tiny_encoder)
    assert ident.startswith("user:tiny-encoder:") and ident == user_encoder_id(tiny_encoder)
    vecs = embed(["where is my parcel", "reset my password"], path=str(tiny_encoder), encoder_id=ident)
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_users_own_encoder_runs_the_pipeline_and_chat(tmp_path, tiny_records, tiny_encoder, prefect_api_env):
    """`bucketchat pipeline --encoder FOLDER` with a sentence-transformers model built offline: the
    table and the model record its identity, chat (the registered champion) answers with it after the
    original folder is gone, and a table embedded by the shipped encoder is refused."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from conversations.records import load_records
    from retrieval.build import build_table
    from retrieval.encoder import INT8_SUFFIX, user_encoder_id
    from retrieval.store import open_table, table_encoder
    from tests.conftest import write_jsonl

    mine = tmp_path / "my-encoder"
    shutil.copytree(tiny_encoder, mine)
    ident = user_encoder_id(mine) + INT8_SUFFIX  # its pipeline takes the int8 export, which passes the check
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records)
    env = {
        **os.environ,
        **prefect_api_env,
        "BUCKETCHAT_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}",
    }
    bucketchat = str(Path(sys.executable).parent / "bucketchat")
    work = tmp_path / "work"
    done = subprocess.run(
        [bucketchat, "pipeline", "--data", str(data), "--workdir", str(work), "--encoder", str(mine), "--epochs", "30"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((work / "chat_model_meta.json").read_text())
    assert meta["encoder"] == ident == table_encoder(open_table(str(work / "llm_chat.db"), "conversations", meta["table"]["version"]))
    shutil.rmtree(mine)  # the table and the model keep their own copies

    def ask(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bucketchat, "chat", "--json", *extra], input="where is my parcel\n", env=env, capture_output=True, text=True, timeout=120
        )

    asked = ask()
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["response"] == INTENTS["track_order"][0]
    pairs, _ = load_records(data)
    build_table(pairs, tmp_path / "minilm.db", "conversations")  # embedded by the shipped encoder
    refused = ask("--llm_db", str(tmp_path / "minilm.db"))
    assert refused.returncode != 0 and "encoder" in refused.stderr and "Traceback" not in refused.stderr


def test_finetune_encoder_re_embeds_the_pinned_version_once(tmp_path, tiny_records, tiny_encoder):
    """`finetune --encoder` on a table embedded by the shipped encoder trains on a re-embedded copy of
    the version (same rows and buckets, the user's vectors); a second run reuses that copy."""
    from conversations.records import load_records
    from retrieval.build import build_table
    from retrieval.encoder import INT8_SUFFIX, user_encoder_id
    from retrieval.index_files import index_dir
    from retrieval.store import open_table, read_columns, table_encoder
    from tasks.database import embed_version
    from tests.conftest import write_jsonl

    pairs, _ = load_records(write_jsonl(tmp_path / "d.jsonl", tiny_records))
    db = str(tmp_path / "db")
    first = build_table(pairs, db, "conversations").version
    again = embed_version.fn(db, "conversations", first, str(tiny_encoder))
    assert again > first
    tbl = open_table(db, "conversations", again)
    assert table_encoder(tbl) == user_encoder_id(tiny_encoder) + INT8_SUFFIX and tbl.schema.field("vector").type.list_size == 32
    rows = lambda v: sorted(read_columns(open_table(db, "conversations", v), ["id", "bucket", "assistant"]).to_pylist(), key=str)  # noqa: E731
    assert rows(again) == rows(first)
    assert (index_dir(db, "conversations", again) / "index.json").is_file()  # chat opens it, nothing to build
    assert embed_version.fn(db, "conversations", again, str(tiny_encoder)) == again  # already embedded: no new version


def test_a_user_encoder_runs_in_int8_only_when_its_pipeline_allows_and_its_vectors_pass_the_check(tmp_path, tiny_encoder, monkeypatch):
    import json
    import shutil

    import numpy as np

    from retrieval import encoder
    from retrieval.store import keep_encoder

    ident = encoder.user_encoder_id(tiny_encoder)
    assert encoder.int8_unsupported(tiny_encoder) is None
    used, why = encoder.int8_decision(str(tiny_encoder))
    assert used and why.startswith("int8 (mean cosine")
    checked = encoder.int8_model_path(str(tiny_encoder)).with_suffix(".check.json")
    assert json.loads(checked.read_text())["cosine"] >= encoder.INT8_MIN_COSINE  # kept: checked once per machine
    texts = ["where is my parcel", "boil an egg", "refund my card"]
    int8 = encoder.embed(texts, path=str(tiny_encoder), encoder_id=ident + encoder.INT8_SUFFIX)
    fp32 = encoder.embed(texts, path=str(tiny_encoder), encoder_id=ident)
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5) and (int8 * fp32).sum(1).min() >= 0.99
    assert keep_encoder(tmp_path / "db", tiny_encoder)[0] == ident + encoder.INT8_SUFFIX
    # A stricter check than its vectors pass: fp32, and the table's id says so.
    monkeypatch.setattr(encoder, "INT8_MIN_COSINE", 1.01)
    used, why = encoder.int8_decision(str(tiny_encoder))
    assert not used and "too far from fp32" in why
    assert keep_encoder(tmp_path / "db2", tiny_encoder)[0] == ident
    monkeypatch.undo()
    # A pipeline the export does not cover (a dense layer after pooling): fp32, with the reason.
    dense = tmp_path / "dense-encoder"
    shutil.copytree(tiny_encoder, dense)
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(
        json.dumps([*modules, {"idx": 9, "name": "9", "path": "9_Dense", "type": "sentence_transformers.models.Dense"}])
    )
    assert "Dense" in encoder.int8_unsupported(dense)
    assert keep_encoder(tmp_path / "db3", dense)[0] == encoder.user_encoder_id(dense)
