"""Property-based fuzzing of the loaders (hypothesis): random bytes, any Unicode (lone surrogates,
NUL and control characters, byte-order marks, CRLF), other encodings, truncated lines, huge lines,
deep JSON and wrong types never crash them, and every non-blank line is accounted for — loaded as
pairs, or in the rejects with a reason and a fix; the counts add up, through to the merged dataset.

Piped chat and the server get the same inputs in tests/test_edges.py."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversations.dataset import read_pairs
from conversations.records import iter_records

LIMIT = 4096  # the loaders' line limit, scaled down so huge lines stay cheap to generate

# Any code point, lone surrogates included (JSON escapes them as \\udXXX), plus the troublemakers.
text = st.one_of(
    st.text(min_size=0, max_size=40),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.lists(st.sampled_from(["\ud800", "\udfff", "\x00", "\ufeff", "\r\n", "\x1b", "\x85", "ok", " "]), max_size=8).map("".join),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
json_value = st.recursive(
    scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=8
)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 3]), "content": st.one_of(text, scalar)})
record = st.one_of(
    st.fixed_dictionaries(
        {"user": st.one_of(text, scalar), "assistant": st.one_of(text, scalar)},
        optional={"intent": scalar, "context": json_value, "source": scalar, "extra": json_value},
    ),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(turn, max_size=5), json_value)}),
    json_value,
)


@st.composite
def line(draw) -> bytes:
    kind = draw(st.sampled_from(["record", "record", "raw_unicode", "latin1", "bom_crlf", "truncated", "bytes", "huge", "deep", "blank"]))
    if kind == "record":
        return json.dumps(draw(record)).encode()
    if kind == "raw_unicode":  # non-ASCII written as itself, not escaped (lone surrogates cannot be: escaped)
        return json.dumps(draw(record), ensure_ascii=False).encode("utf-8", "backslashreplace")
    if kind == "latin1":  # a line from a file saved in another encoding
        return json.dumps({"user": "café " + draw(text), "assistant": "crème brûlée"}, ensure_ascii=False).encode("latin-1", "replace")
    if kind == "bom_crlf":
        return b"\xef\xbb\xbf" + json.dumps(draw(record)).encode() + b"\r"
    if kind == "truncated":
        full = json.dumps(draw(record)).encode()
        return full[: draw(st.integers(0, max(0, len(full) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if kind == "huge":
        return b'{"user": "' + b"x" * draw(st.integers(LIMIT, 3 * LIMIT)) + b'", "assistant": "y"}'
    if kind == "deep":
        depth = draw(st.integers(900, 3000))
        return b'{"user": "a", "assistant": "b", "x": ' + b"[" * depth + b"]" * depth + b"}"
    return draw(st.sampled_from([b"", b"   ", b"\t"]))


def _write(lines: list[bytes]) -> tuple[Path, set[int]]:
    path = Path(tempfile.mkdtemp(prefix="fuzz-")) / "drop.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    counted = {i for i, raw in enumerate(lines, start=1) if raw.strip()}
    return path, counted


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line(), max_size=25))
def test_every_line_is_loaded_or_rejected_with_a_reason(lines):
    path, counted = _write(lines)
    pair_lines, reject_lines = set(), []
    for item in iter_records(path, max_line_bytes=LIMIT):
        if hasattr(item, "reason"):
            assert item.reason and item.fix and item.line >= 1
            reject_lines.append(item.line)
        else:
            assert item.user.strip() and item.assistant.strip()
            pair_lines.add(item.line)
    assert len(reject_lines) == len(set(reject_lines))  # one reject per bad line
    assert pair_lines.isdisjoint(reject_lines)
    assert pair_lines | set(reject_lines) == counted


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line(), max_size=25), st.lists(line(), max_size=25))
def test_counts_add_up_through_the_merged_dataset(first, second):
    """The pipeline's data stage on two fuzzed drops: the merged rejects file holds every bad line
    (with its file, line, reason and fix) and every dropped pair; kept + dropped = pairs read."""
    from tasks.data import NoUsablePairs, merge_sources, validate_source

    paths, counted = zip(*(_write(lines) for lines in (first, second)))
    staging = paths[0].parent / "shards"
    shards = [validate_source.fn(str(p), str(staging)) for p in paths]
    pairs_read = sum(s["pairs"] for s in shards)
    out = paths[0].parent / "merged.jsonl"
    try:
        merged = merge_sources.fn(shards, str(out))
    except NoUsablePairs:  # nothing kept: an error, with every line still in the rejects file
        report = json.loads(out.with_name("merged.report.json").read_text())
        rejects = out.with_name("merged.rejects.jsonl").read_text(encoding="utf-8").splitlines()
        assert report["kept"] == 0 and len(rejects) == sum(s["malformed"] for s in shards) + report["dropped_total"]
        return
    report = json.loads(Path(merged["report"]).read_text())
    rejects = [json.loads(l) for l in Path(merged["rejects"]).read_text(encoding="utf-8").splitlines()]
    malformed = [r for r in rejects if "line" in r and "reason" in r and r.get("file") in {str(p) for p in paths}]
    assert (
        merged["rejected_lines"]
        == sum(s["malformed"] for s in shards)
        == sum(len(c) for c in counted) - sum(len({p.line for p in read_pairs(path)[0]}) for path in paths)
    )
    assert report["kept"] + report["dropped_total"] == pairs_read
    assert merged["records"] == report["kept"]
    assert len(rejects) == merged["rejected_lines"] + report["dropped_total"]
    assert all(r["reason"] for r in rejects) and len(malformed) >= merged["rejected_lines"]


def test_a_line_far_over_the_limit_is_rejected_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"user": "hi", "assistant": "hello"}\n')
        fh.write(b'{"user": "' + b"x" * (40 << 20) + b'", "assistant": "y"}\n')  # 40 MiB on one line
        fh.write(b'{"user": "bye", "assistant": "see you"}\n')
    items = list(iter_records(path))
    assert [getattr(i, "user", None) for i in items] == ["hi", None, "bye"]
    assert items[1].line == 2 and "over the 1,048,576-byte limit" in items[1].reason and len(items[1].raw) < 300
