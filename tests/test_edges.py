"""Any text through every entry point (hypothesis): piped chat and the HTTP server get arbitrary
bytes and arbitrary Unicode (lone surrogates, NUL, byte-order marks, CRLF, other encodings, huge
lines); nothing crashes, the server never answers 500, and every input line is accounted for.
The loaders and the pipeline's data stage get the same in tests/test_fuzz.py; the whole pipeline
command on such a file is the last test here."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversations.text import MAX_MESSAGE_CHARS
from interfaces.repl import answer_lines
from interfaces.server import ServerConfig
from retrieval.answer import ChatEngine
from tests.bench.reliability import TROUBLE, blank
from tests.conftest import INTENTS, running_server, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
any_text = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=60),  # lone surrogates too
    st.lists(st.sampled_from(TROUBLE), max_size=8).map("".join),
)


@st.composite
def input_line(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "text", "bytes", "latin1", "huge", "blank"]))
    if kind == "text":  # a lone surrogate becomes the bytes Python would write for it: not UTF-8
        return draw(any_text).encode("utf-8", "surrogatepass").replace(b"\n", b" ")
    if kind == "bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if kind == "latin1":
        return ("café " + draw(st.text(max_size=20))).encode("latin-1", "replace").replace(b"\n", b" ")
    if kind == "huge":
        return b"x" * draw(st.integers(4 * MAX_MESSAGE_CHARS + 1, 4 * MAX_MESSAGE_CHARS + 50_000))
    return draw(st.sampled_from([b"", b"  ", b"\t", b"\r"]))


@pytest.fixture(scope="module")
def engine(chat_model):
    return ChatEngine(*chat_model)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(input_line(), max_size=12))
def test_piped_chat_answers_or_reports_every_line(engine, lines):
    out = io.BytesIO()
    failed = answer_lines(engine, io.BytesIO(b"\n".join(lines) + b"\n"), out, as_json=True, echo=False)
    rows = [json.loads(l) for l in out.getvalue().decode("utf-8").split("\n") if l]
    expected = [i for i, raw in enumerate(lines, start=1) if not blank(raw)]
    assert [r["line"] for r in rows] == expected  # every line once, in order
    assert all(("error" in r) != ("response" in r) for r in rows)
    assert failed == sum("error" in r for r in rows)
    for r in rows:
        assert r["error"] if "error" in r else isinstance(r["response"], str) and r["response"]


def test_piped_chat_command_goes_on_after_a_bad_line_and_strict_sets_the_status(chat_model):
    weights, meta = chat_model
    data = b"where is my parcel\n\xff\xfe\n\xef\xbb\xbfhow long do I boil an egg\r\n\xed\xa0\x80 hi\n\x00\n"
    cmd = [sys.executable, "-m", "interfaces.cli", "chat", "--weights", weights, "--meta", meta, "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, input=data, capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(l) for l in done.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["response"] == INTENTS["track_order"][0] and rows[2]["response"] == INTENTS["boil_egg"][0]
    assert rows[1]["error"].startswith("invalid UTF-8 at byte 0;") and rows[3]["error"].startswith("invalid UTF-8 at byte 0;")
    assert rows[4]["error"].startswith("the message is empty")
    assert b"Traceback" not in done.stderr

    strict = subprocess.run([*cmd[:-1], "--strict"], input=data, capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert strict.returncode == 1
    assert strict.stdout.decode().splitlines() == [INTENTS["track_order"][0], INTENTS["boil_egg"][0]]
    assert strict.stderr.decode().splitlines() == [
        "bucketchat chat: line 2: invalid UTF-8 at byte 0; save the input as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE`)",
        "bucketchat chat: line 4: invalid UTF-8 at byte 0; save the input as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE`)",
        "bucketchat chat: line 5: the message is empty; give the message some text",
    ]


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, ServerConfig(max_body_bytes=8192, max_message_chars=500)) as url:
        yield url


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]),
        "content": st.one_of(
            any_text, json_value, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": any_text}))
        ),
    }
)
asked = st.tuples(st.lists(message, max_size=3), any_text).map(lambda m: m[0] + [{"role": "user", "content": m[1]}])  # ends with a question
request = st.one_of(
    st.fixed_dictionaries({"messages": asked}, optional={"stream": st.booleans()}),
    st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=4)},
        optional={"stream": st.booleans(), "seed": st.integers(), "style_mode": json_value, "explain": st.booleans(), "n": json_value},
    ),
    st.fixed_dictionaries({"messages": st.just([]) | json_value}),
    json_value,
)


def _check(response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 413), response.text
    body = response.json() if not response.text.startswith("data:") else None
    if response.status_code == 200:
        assert body is None or isinstance(body["choices"][0]["message"]["content"], str)
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request)
def test_server_never_answers_500_to_any_json(server, body):
    # json.dumps writes a lone surrogate as its escape: the server decodes it back into one.
    _check(
        httpx.post(
            f"{server}/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"}, timeout=30
        )
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_server_never_answers_500_to_any_bytes(server, body):
    _check(httpx.post(f"{server}/v1/chat/completions", content=body, timeout=30))


def test_server_names_the_bad_message(server):
    r = httpx.post(
        f"{server}/v1/chat/completions", content=json.dumps({"messages": [{"role": "user", "content": "\ud800 hi"}]}), timeout=30
    )
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "messages[0].content holds a lone surrogate U+D800 at character 0 (a \\ud800 escape without its pair); write the character itself in UTF-8, or escape it as a full surrogate pair",
        "type": "invalid_request_error",
        "param": "messages[0].content",
        "code": "invalid_text",
    }
    ok = httpx.post(
        f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "\ufeffwhere is my\x00 parcel\r\n"}]}, timeout=30
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == INTENTS["track_order"][0]


@pytest.mark.slow
def test_pipeline_command_on_a_hostile_file_accounts_for_every_line(tmp_path, tiny_records, prefect_api_env):
    """The real command, in its own process: the good lines train a champion, every bad line is in
    the rejects file with its line number, and kept + rejected = lines read."""
    good = write_jsonl(tmp_path / "good.jsonl", tiny_records).read_bytes().splitlines()
    bad = [
        b'{"user": "\\ud800 hi", "assistant": "x"}',  # a lone surrogate escape
        b'\xff\xfe{"user": "a", "assistant": "b"}',  # not UTF-8
        b'{"user": "caf\xe9", "assistant": "b"}',  # Latin-1
        b'{"user": "ok", "assistant": "fine", "meta": {"k": ["\\udfff"]}}',  # a surrogate in metadata
        b"x" * (2 << 20),  # 2 MiB on one line
        b"\x00\x00",
    ]
    lines = [b"\xef\xbb\xbf" + good[0] + b"\r", *good[1:12], *bad, *good[12:], b"", b"   "]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    env = {**os.environ, **prefect_api_env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [
        sys.executable,
        "-m",
        "interfaces.cli",
        "pipeline",
        "--data",
        str(data),
        "--workdir",
        str(tmp_path / "work"),
        "--epochs",
        "20",
        "--hidden_dim",
        "64",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "6 malformed line(s) skipped" in done.stderr
    rejects = [json.loads(l) for l in (tmp_path / "work" / "dataset.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    malformed = [r for r in rejects if r.get("file") == str(data)]
    assert [r["line"] for r in malformed] == [13, 14, 15, 16, 17, 18]
    report = json.loads((tmp_path / "work" / "dataset.report.json").read_text())
    assert report["kept"] + report["dropped_total"] + len(malformed) == len(good) + len(bad)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["hostile.jsonl", "good.jsonl", "mlflow.db", "mlflow.db.lock", "artifacts", "work"]
    )  # nothing outside the workdir and the store
