import json

import pyarrow.parquet as pq
import pytest

from conversations.dataset import normalise, read_pairs, rejects_path, write_dataset, write_rejects
from conversations.records import Pair, load_records
from tests.conftest import write_jsonl


def test_rejects_file_sits_beside_output(tmp_path):
    assert rejects_path(tmp_path / "data.jsonl") == tmp_path / "data.rejects.jsonl"
    assert rejects_path(tmp_path / "llm_chat.db") == tmp_path / "llm_chat.rejects.jsonl"


def test_dotted_names_keep_their_dots(tmp_path):
    from conversations.dataset import sibling

    assert sibling(tmp_path / "conversation_data.sample-ab12.parquet", ".jsonl") == tmp_path / "conversation_data.sample-ab12.jsonl"
    assert rejects_path(tmp_path / "conversation_data.sample.jsonl") == tmp_path / "conversation_data.sample.rejects.jsonl"
    out = write_dataset([Pair("q", "a")], tmp_path / "conversation_data.sample.jsonl")
    assert out == {"jsonl": str(tmp_path / "conversation_data.sample.jsonl"), "parquet": str(tmp_path / "conversation_data.sample.parquet")}
    assert (tmp_path / "conversation_data.sample.parquet").is_file()


def test_normalise_ignores_case_space_and_unicode_form():
    assert normalise("  Hello\u00a0  WORLD ") == normalise("hello world") == "hello world"


def test_dataset_round_trips_through_parquet_and_jsonl(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    out = write_dataset(pairs, tmp_path / "out.jsonl")
    assert pq.read_table(out["parquet"]).num_rows == len(pairs) == 26
    back_parquet, _ = read_pairs(out["parquet"])
    assert back_parquet == pairs
    back_jsonl, rejects = read_pairs(out["jsonl"])
    assert rejects == []
    assert [(p.user, p.assistant, p.context, p.label) for p in back_jsonl] == [(p.user, p.assistant, p.context, p.label) for p in pairs]


def test_write_dataset_streams_a_generator_in_row_groups(tmp_path, monkeypatch):
    import conversations.dataset as dataset

    monkeypatch.setattr(dataset, "WRITE_BATCH", 10)
    pairs = [Pair(f"question {i}", f"answer {i % 3}", line=i) for i in range(25)]
    out = write_dataset((p for p in pairs), tmp_path / "g.jsonl")
    parquet = pq.ParquetFile(out["parquet"])
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [10, 10, 5]
    assert read_pairs(out["parquet"])[0] == pairs
    assert [json.loads(l)["user"] for l in open(out["jsonl"])] == [p.user for p in pairs]
    even = write_dataset(pairs[:20], tmp_path / "even.jsonl")
    assert [pq.ParquetFile(even["parquet"]).metadata.row_group(i).num_rows for i in range(2)] == [10, 10]
    assert pq.ParquetFile(even["parquet"]).num_row_groups == 2
    empty = write_dataset([], tmp_path / "empty.jsonl")
    assert pq.read_table(empty["parquet"]).num_rows == 0 and open(empty["jsonl"]).read() == ""


def test_write_dataset_that_fails_midway_leaves_no_files(tmp_path):
    def broken():
        yield Pair("q", "a")
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        write_dataset(broken(), tmp_path / "b.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_write_rejects_always_writes_a_file(tmp_path):
    path = write_rejects([], tmp_path / "x.jsonl")
    assert open(path).read() == ""
    _, rejects = load_records(write_jsonl(tmp_path / "in.jsonl", ["{oops"]))
    path = write_rejects(rejects, tmp_path / "x.jsonl")
    assert [json.loads(l)["line"] for l in open(path)] == [1]
