"""interfaces/server.py against the official openai client and raw HTTP: answers, streaming,
conversations, auth, and every kind of bad request getting a 4xx JSON error (never a 500)."""

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from interfaces.server import ServerConfig
from retrieval.answer import ChatEngine, ChatOptions
from tests.conftest import INTENTS, free_port, http_process, running_server

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server(chat_model):
    engine = ChatEngine(*chat_model)
    with running_server(engine, ServerConfig(api_key=KEY, model_name="bucketchat-test", max_body_bytes=8192, max_message_chars=500)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_openai_client_gets_the_stored_response(client):
    out = client.chat.completions.create(
        model="bucketchat-test", messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "I forgot my password"}]
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == INTENTS["reset_password"][0]
    assert out.choices[0].finish_reason == "stop" and out.model == "bucketchat-test"
    extra = out.model_extra["bucketchat"]
    assert (
        extra["fallback"] is False and 0 < extra["confidence"] <= 1 and extra["candidates"][0]["response"] == INTENTS["reset_password"][0]
    )
    assert out.usage.completion_tokens == len(INTENTS["reset_password"][0].split())


def test_streaming_sends_the_same_answer_in_pieces(client):
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "how long to boil an egg"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == INTENTS["boil_egg"][0]
    assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_conversation_history_answers_a_follow_up(client):
    out = client.chat.completions.create(
        model="x",
        messages=[
            {"role": "user", "content": "where is my order?"},
            {"role": "assistant", "content": INTENTS["track_order"][0]},
            {"role": "user", "content": "and what about that?"},
        ],
    )
    assert out.choices[0].message.content == INTENTS["track_order"][0]
    assert out.model_extra["bucketchat"]["context"] == "where is my order?"


def test_explain_on_request_and_sampling_params_are_ignored(client):
    out = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "undo my last git commit"}],
        temperature=1.7,
        max_tokens=3,
        top_p=0.1,
        seed=5,
        extra_body={"explain": True},
    )
    assert out.choices[0].message.content == INTENTS["undo_commit"][0]  # not cut to 3 tokens: a stored response
    why = out.model_extra["bucketchat"]["why"]
    assert why["candidates"][0]["records"] and why["buckets"][0]["bucket"] == out.model_extra["bucketchat"]["bucket"]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["bucketchat-test"]
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["model_size"] == "base" and health["table"]["version"] >= 1


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, "tools"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', 400, "messages[1]"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400, "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "' + b"a" * 600 + b'"}]}', 400, "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
        (b'{"messages": [{"role": "user", "content": "' + b"a" * 9000 + b'"}]}', 413, None),
        (b"[" * 3000 + b"]" * 3000, 400, None),
    ],
)
def test_bad_requests_get_4xx_json_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param


def test_unknown_routes_and_methods_are_json_4xx(server):
    r = httpx.get(f"{server}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server}/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_many_simultaneous_requests_are_all_answered_correctly(server, chat_model):
    questions = [asks[i % len(asks)] for _, asks in INTENTS.values() for i in range(12)]

    def ask(q):
        r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": q}]}, headers=AUTH, timeout=60)
        return r.status_code, r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, questions))
    assert [s for s, _ in results] == [200] * len(questions)
    # concurrency changes nothing: each answer is what the engine gives that question alone
    alone = ChatEngine(*chat_model)
    assert [text for _, text in results] == [alone.answer(q).response for q in questions]


def test_past_max_concurrency_requests_get_429_not_errors(chat_model):
    engine = ChatEngine(*chat_model, ChatOptions(style_mode="balanced"))
    with running_server(engine, ServerConfig(max_concurrency=1, threads=1)) as url:

        def ask(_):
            return httpx.post(
                f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "where is my parcel"}]}, timeout=60
            )

        with ThreadPoolExecutor(24) as pool:
            rs = list(pool.map(ask, range(48)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes
    limited = next(r for r in rs if r.status_code == 429)
    assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"


def test_config_is_validated():
    with pytest.raises(ValueError, match="--api_key"):
        ServerConfig(api_key="short")
    with pytest.raises(ValueError, match="--port"):
        ServerConfig(port=0)
    with pytest.raises(ValueError, match="--workers"):
        ServerConfig(workers=0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="helpers end with their parent through Linux's PR_SET_PDEATHSIG")
def test_workers_share_the_port_a_dead_one_is_replaced_and_all_end_with_the_command(chat_model, tmp_path):
    import os
    import signal
    import time

    from interfaces.serving import RESTART_AFTER_S

    port, (weights, meta) = free_port(), chat_model
    cmd = [sys.executable, "-m", "interfaces.cli", "serve", "--weights", weights, "--meta", meta, "--port", str(port), "--workers", "2"]
    url = f"http://127.0.0.1:{port}"

    def workers_seen(want: int, timeout: float = 30.0) -> dict:
        seen, deadline = {}, time.monotonic() + timeout
        while len(seen) < want and time.monotonic() < deadline:
            with httpx.Client(base_url=url, timeout=10) as c:  # a new connection each time
                body = {"messages": [{"role": "user", "content": "where is my parcel"}]}
                seen[c.get("/healthz").json()["worker"]] = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
                    "content"
                ]
        return seen

    root = os.path.dirname(os.path.dirname(__file__))
    with http_process(cmd, f"{url}/healthz", tmp_path / "serve.log", cwd=root) as proc:
        seen = workers_seen(2)
        assert len(seen) == 2 and proc.pid in seen
        assert set(seen.values()) == {INTENTS["track_order"][0]}  # both processes give the same answer
        helper = next(pid for pid in seen if pid != proc.pid)
        time.sleep(RESTART_AFTER_S)  # past its start-up: a death now is a crash while serving
        os.kill(helper, signal.SIGKILL)  # died while serving: started again
        replaced = next(iter(set(workers_seen(2)) - {proc.pid, helper}), None)
        assert replaced is not None and _alive(replaced), (tmp_path / "serve.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)  # the command dies without a word: its helpers go with it
        proc.wait(5)
        deadline = time.monotonic() + 5
        while _alive(replaced) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(replaced)


def _rss_mb(pid: int) -> float:
    for row in open(f"/proc/{pid}/status"):
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_abuse_flood_gets_4xx_or_429_and_memory_stays_bounded(chat_model, tmp_path):
    """`bucketchat serve` in its own process, flooded by 32 clients with oversized bodies (declared
    and chunked), malformed JSON, wrong keys and real questions: only 200/400/401/413/429 come
    back, it keeps serving, and its memory does not grow with what it was sent."""
    import os
    import sys

    port = free_port()
    weights, meta = chat_model
    cmd = [
        sys.executable,
        "-m",
        "interfaces.cli",
        "serve",
        "--weights",
        weights,
        "--meta",
        meta,
        "--port",
        str(port),
        "--api_key",
        KEY,
        "--max_concurrency",
        "8",
        "--workers",
        "1",  # one process: its memory is what is measured
    ]
    url = f"http://127.0.0.1:{port}"
    with http_process(cmd, f"{url}/healthz", tmp_path / "serve.log", cwd=os.path.dirname(os.path.dirname(__file__))) as proc:
        chunk = b"x" * 65536

        def chunked():
            for _ in range(32):  # 2 MiB with no Content-Length
                yield chunk

        good = {"messages": [{"role": "user", "content": "where is my parcel"}]}
        attacks = [
            lambda c: c.post("/v1/chat/completions", content=b"{" * 4_000_000, headers={**AUTH, "content-type": "application/json"}),
            lambda c: c.post("/v1/chat/completions", content=chunked(), headers=AUTH),
            lambda c: c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"', headers=AUTH),
            lambda c: c.post("/v1/chat/completions", content=b"[" * 5000 + b"]" * 5000, headers=AUTH),
            lambda c: c.post("/v1/chat/completions", json=good, headers={"authorization": "Bearer wrong-key-000000000"}),
            lambda c: c.post("/v1/chat/completions", json=good, headers=AUTH),
        ]

        def hammer(i):
            with httpx.Client(base_url=url, timeout=60) as c:
                return [attacks[(i + j) % len(attacks)](c).status_code for j in range(24)]

        with ThreadPoolExecutor(32) as pool:  # a warm-up round: allocator pools, caches, threads
            list(pool.map(hammer, range(32)))
        before = _rss_mb(proc.pid)
        with ThreadPoolExecutor(32) as pool:
            codes = [c for batch in pool.map(hammer, range(64)) for c in batch]
        after = _rss_mb(proc.pid)
        assert set(codes) <= {200, 400, 401, 413, 429} and {400, 401, 413} <= set(codes), sorted(set(codes))
        assert 200 in codes
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200 and proc.poll() is None
        # 1,536 requests, a third of them with bodies of 2-4 MiB; growth stays a rounding error of that.
        print(f"server RSS {before:.0f} -> {after:.0f} MB over {len(codes)} requests")
        assert after - before < 64, (before, after)
