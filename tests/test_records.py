import json

import pytest

from conversations.dataset import is_dataset, read_pairs, write_dataset
from conversations.records import Columns, RecordError, load_records
from tests.conftest import write_jsonl


def test_flat_pair_keeps_metadata_and_label(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"user": " hi ", "assistant": "hello", "intent": "greet", "ticket": 7}])
    pairs, rejects = load_records(path)
    assert rejects == []
    assert [(p.user, p.assistant, p.label, p.meta, p.source, p.line, p.id) for p in pairs] == [
        ("hi", "hello", "greet", {"ticket": 7}, "d", 1, "d:1:0")
    ]


def test_multi_turn_yields_one_pair_per_assistant_turn_with_context(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    pairs, rejects = load_records(write_jsonl(tmp_path / "m.jsonl", [rec]))
    assert rejects == []
    assert [(p.user, p.assistant, p.context, p.turn) for p in pairs] == [
        ("a", "b", (), 0),
        ("c", "d", (("user", "a"), ("assistant", "b")), 1),
    ]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "line is a JSON list, not an object"),
        ('{"user": "x"}', "missing field 'assistant'"),
        ('{"user": "", "assistant": "y"}', "field 'user' is empty"),
        ('{"user": 3, "assistant": "y"}', "field 'user' must be a string, got int"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role is 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "'messages' has no assistant turn that follows a user turn"),
        ('{"messages": "hi"}', "field 'messages' must be a list"),
        ('{"user": "x", "assistant": "y", "intent": [1]}', "field 'intent' must be a string or integer"),
    ],
)
def test_malformed_lines_are_rejected_with_line_number_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"user": "ok", "assistant": "fine"}', line])
    pairs, rejects = load_records(path)
    assert len(pairs) == 1
    assert len(rejects) == 1
    assert rejects[0].line == 2
    assert rejects[0].reason.startswith(reason), rejects[0].reason
    assert rejects[0].raw == line
    assert rejects[0].fix


def test_invalid_utf8_is_rejected_not_fatal(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"user": "caf\xe9", "assistant": "x"}\n{"user": "ok", "assistant": "y"}\n')
    pairs, rejects = load_records(path)
    assert [p.user for p in pairs] == ["ok"]
    assert (rejects[0].line, rejects[0].reason) == (1, "invalid UTF-8 at byte 13")


def test_blank_lines_are_skipped_without_reject(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", ["", '{"user": "u", "assistant": "a"}', "   "])
    pairs, rejects = load_records(path)
    assert (len(pairs), rejects) == (1, [])


def test_strict_names_file_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"user": "u", "assistant": "a"}', '{"user": "u"}'])
    with pytest.raises(RecordError, match=r"s\.jsonl:2: missing field 'assistant'\. Fix: give both"):
        load_records(path, strict=True)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


# Tables and JSON arrays: the same pairs and rejects as JSONL, in the table's own terms.


def test_csv_columns_map_to_pairs_and_other_columns_are_metadata(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(
        b"\xef\xbb\xbfticket,question,reply,topic,source\r\n"
        b'7,where is my parcel,"It ships in 2 days.\nTrack it online.",shipping,email\r\n'
        b"8,hi,hello,,chat\r\n"
    )
    pairs, rejects = load_records(path, columns=Columns(user="question", assistant="reply", label="topic"))
    assert rejects == []
    assert [(p.user, p.assistant, p.label, p.meta, p.line) for p in pairs] == [
        ("where is my parcel", "It ships in 2 days.\nTrack it online.", "shipping", {"ticket": "7", "col_source": "email"}, 3),
        ("hi", "hello", None, {"ticket": "8", "col_source": "chat"}, 4),
    ]


def test_csv_rows_that_cannot_be_used_are_rejected_with_their_line_and_column(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(b"q;a\nfine;ok\n;no question\nbad \xff bytes;x\n")  # semicolons: the delimiter is sniffed
    pairs, rejects = load_records(path, columns=Columns(user="q", assistant="a"))
    assert [(p.user, p.assistant) for p in pairs] == [("fine", "ok")]
    assert [(r.line, r.reason, r.fix) for r in rejects] == [
        (3, "empty cell in column 'q'", "fill the cell or drop the row"),
        (4, rejects[1].reason, "save the file as UTF-8, with each character written as itself"),
    ]
    assert rejects[1].reason.startswith("field 'user' holds text that is not valid Unicode")


def test_a_table_without_the_named_column_says_which_columns_it_has_and_the_flag(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("question,reply\nhi,hello\n")
    with pytest.raises(ValueError, match=r"has no column 'user'; its columns are 'question', 'reply'; name the right one with --user_col"):
        load_records(path)


def test_parquet_table_rows_are_numbered_from_one(tmp_path):
    import pandas as pd

    path = tmp_path / "export.parquet"
    pd.DataFrame({"user": ["hi", None, "bye"], "assistant": ["hello", "x", "see you"], "intent": [1, 2, 3]}).to_parquet(path)
    pairs, rejects = load_records(path)
    assert [(p.user, p.label, p.line) for p in pairs] == [("hi", "1", 1), ("bye", "3", 3)]
    assert [(r.line, r.reason) for r in rejects] == [(2, "empty cell in column 'user'")]


def test_a_dataset_this_project_wrote_is_read_as_it_was_written_not_as_a_user_table(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    out = write_dataset(pairs, tmp_path / "ds.jsonl")
    assert is_dataset(out["parquet"]) and not is_dataset(tiny_jsonl)
    back, rejects = read_pairs(out["parquet"])
    assert back == pairs and rejects == []


def test_json_array_elements_are_records_and_anything_else_is_refused(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"user": "hi", "assistant": "hello"}, {"user": "x"}, "junk"]))
    pairs, rejects = load_records(path)
    assert [(p.user, p.line) for p in pairs] == [("hi", 1)]
    assert [(r.line, r.reason) for r in rejects] == [(2, "missing field 'assistant'"), (3, "line is a JSON str, not an object")]
    (tmp_path / "o.json").write_text('{"user": "hi"}')
    with pytest.raises(ValueError, match="holds a JSON dict, not an array"):
        load_records(tmp_path / "o.json")
