import pytest

from conversations.records import RecordError, load_records
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
