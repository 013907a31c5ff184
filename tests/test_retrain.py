"""Scheduled retraining (flows/retrain.py): incremental over a folder of data drops, real Prefect runs,
real LanceDB and a real MLflow registry."""

import json
import time

import pytest

from flows.retrain import retrain_flow
from retrieval.store import open_table
from tasks import registry
from tests.conftest import write_jsonl

TRAIN = {"epochs": 20, "lr": 5e-3}
HEAD = {"hidden_dim": 32, "dropout": 0.0}


def _state(work) -> tuple[int, list[int], int | None, float]:
    """(table versions, registered versions, champion, newest file mtime under the workdir)."""
    tbl = open_table(work / "llm_chat.db", "conversations")
    newest = max(p.stat().st_mtime for p in work.rglob("*") if p.is_file())
    return len(tbl.list_versions()), [v["version"] for v in registry.list_versions()], registry.champion_version(), newest


@pytest.mark.slow
def test_unchanged_drops_change_nothing_and_a_new_drop_retrains(tmp_path, tiny_records, prefect_harness, mlflow_store):
    drops, work = tmp_path / "drops", tmp_path / "work"
    drops.mkdir()
    write_jsonl(drops / "2026-11-01.jsonl", tiny_records[:18])
    write_jsonl(drops / "2026-11-01.rejects.jsonl", ["{not a drop"])  # rejects files are not drops

    first = retrain_flow(str(drops), str(work), 0, TRAIN, HEAD)
    assert first["changed"] and first["registry"]["promoted"] and first["drops"] == [str(drops / "2026-11-01.jsonl")]
    before = _state(work)
    assert before[1:3] == ([1], 1)

    t0 = time.perf_counter()
    again = retrain_flow(str(drops), str(work), 0, TRAIN, HEAD)
    quick = time.perf_counter() - t0
    assert not again["changed"] and again["build"]["reused"] and again["build"]["embedded"] == 0
    assert again["registry"]["version"] == 1 and not again["registry"]["promoted"]
    assert again["registry"]["reason"].startswith("unchanged: v1 was already trained")
    assert _state(work) == before  # no table version, no model version, no file touched
    assert quick < 15, quick

    # A new drop: only its rows are embedded (target 0: no synthetic variants to redraw); a model is
    # trained and registered, and the champion moves only if it is better on the new validation rows.
    write_jsonl(drops / "2026-11-02.jsonl", tiny_records[18:])
    third = retrain_flow(str(drops), str(work), 0, TRAIN, HEAD)
    assert third["changed"] and not third["build"]["reused"]
    assert (third["build"]["rows"], third["build"]["embedded"]) == (24, 6)  # old rows come from the cache
    assert third["registry"]["version"] == 2
    assert third["registry"]["reason"].startswith(("validation response accuracy", "the champion cannot"))
    assert registry.champion_version() == (2 if third["registry"]["promoted"] else 1)
    assert _state(work)[0] > before[0]


def test_retrain_refuses_an_empty_drop_folder(tmp_path):
    (tmp_path / "drops").mkdir()
    with pytest.raises(
        ValueError, match=r"holds no data drops; put conversation files there \(\*.jsonl, \*.json, \*.csv, \*.tsv, \*.parquet\)"
    ):
        retrain_flow.fn(str(tmp_path / "drops"), str(tmp_path / "work"))


def test_build_reuses_the_latest_version_only_for_identical_content(tmp_path, tiny_jsonl):
    from conversations.records import load_records
    from retrieval.build import build_table

    pairs, _ = load_records(tiny_jsonl)
    first = build_table(pairs, tmp_path / "db", "t")
    same = build_table(pairs, tmp_path / "db", "t")
    assert (same.version, same.reused, same.embedded, same.rows) == (first.version, True, 0, 26)
    assert build_table(pairs, tmp_path / "db", "t", seed=1).reused is False  # other bucketing settings
    reordered = build_table(pairs[::-1], tmp_path / "db", "t")
    assert not reordered.reused and reordered.embedded == 0


def test_a_version_missing_its_indices_is_rebuilt_not_reused(tmp_path, tiny_jsonl):
    """What a build killed between writing rows and indexing them leaves behind."""
    from conversations.records import load_records
    from retrieval.build import build_table, content_key
    from retrieval.store import connect, schema

    pairs, _ = load_records(tiny_jsonl)
    first = build_table(pairs, tmp_path / "db", "t")
    tbl = open_table(tmp_path / "db", "t")
    data = tbl.to_arrow()
    # The same rows and content key, written without the indices.
    connect(tmp_path / "db").create_table("t", data=data.cast(schema(content=content_key(pairs, 10, 0))), mode="overwrite")
    again = build_table(pairs, tmp_path / "db", "t")
    assert not again.reused and again.version > first.version + 1
    assert {str(i.index_type) for i in open_table(tmp_path / "db", "t").list_indices()} == {"FTS", "Bitmap"}
    assert json.loads(json.dumps(again.buckets)) == json.loads(json.dumps(first.buckets))
