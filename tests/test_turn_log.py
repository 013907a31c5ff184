"""The conversation log (retrieval/turn_log.py) with real processes: turns are typed rows, a kill -9
loses at most the last second and the next log seals what the killed one wrote, and chat and serve
record every turn beside the table (none with --no_log), a clean stop of the server included."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.answer import Answer
from retrieval.turn_log import TurnLog, read_turns, turns_folder
from tests.conftest import INTENTS, free_port, http_process, train_chat_model

ROOT = Path(__file__).resolve().parents[1]


def _answer(i: int) -> Answer:
    return Answer(response=f"r{i}", bucket=i % 10, confidence=0.5, fallback=i % 2 == 1, chosen=f"r{i}", margin=0.25, similarity=0.75)


def test_turns_are_kept_as_typed_rows_and_sealed_into_parquet_on_close(tmp_path):
    log = TurnLog(tmp_path, model="models:/bot@champion", table="conversations", table_version=3, source="chat")
    for i in range(5):
        log.record(f"message {i}", _answer(i), conversation="c1" if i < 3 else "c2")
    log.close()
    assert [p.suffix for p in tmp_path.iterdir()] == [".parquet"]
    turns = read_turns(tmp_path).to_pylist()
    assert [t["message"] for t in turns] == [f"message {i}" for i in range(5)]
    assert [t["conversation"] for t in turns] == ["c1", "c1", "c1", "c2", "c2"]
    first = turns[1]
    assert {k: first[k] for k in ("response", "chosen", "bucket", "confidence", "margin", "similarity", "fallback")} == {
        "response": "r1",
        "chosen": "r1",
        "bucket": 1,
        "confidence": 0.5,
        "margin": 0.25,
        "similarity": 0.75,
        "fallback": True,
    }
    assert first["model"] == "models:/bot@champion" and first["table_version"] == 3 and first["source"] == "chat"
    assert first["time"].tzinfo is not None
    log.close()  # a second close does nothing


def test_a_full_segment_is_sealed_and_a_new_one_begins(tmp_path, monkeypatch):
    import retrieval.turn_log as turn_log

    monkeypatch.setattr(turn_log, "SEGMENT_MAX_BYTES", 2000)
    log = TurnLog(tmp_path, model="m", table="t", table_version=1, source="serve")
    for i in range(30):
        log.record(f"message {i}", _answer(i), conversation="c")
        if i % 10 == 9:
            log.flush()
    assert len(list(tmp_path.glob("*.parquet"))) >= 2 and len(list(tmp_path.glob("*.jsonl"))) <= 1
    log.close()
    assert [t["message"] for t in read_turns(tmp_path).to_pylist()] == [f"message {i}" for i in range(30)]


def test_feedback_is_kept_with_its_turn_and_the_last_rating_wins(tmp_path):
    log = TurnLog(tmp_path, model="m", table="t", table_version=1, source="serve")
    first, second = log.record("a", _answer(0), conversation="c"), log.record("b", _answer(1), conversation="c")
    log.feedback(first, "bad")
    log.feedback(first, "good")  # changed their mind
    with pytest.raises(ValueError, match="rating must be one of good, bad"):
        log.feedback(second, "meh")
    log.close()
    turns = read_turns(tmp_path).to_pylist()
    assert [(t["message"], t["turn"], t["feedback"]) for t in turns] == [("a", first, "good"), ("b", second, None)]


def test_a_log_that_cannot_write_keeps_its_turns_until_it_can(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = TurnLog("relative", model="m", table="t", table_version=1, source="chat")
    monkeypatch.chdir("/")  # a later chdir does not move the log
    log.record("a", _answer(0), conversation="c")
    assert log.flush() == 1 and (tmp_path / "relative").is_dir()
    blocked = tmp_path / "relative" / "blocked"
    log.segment = blocked / "turns-1-1-moved.jsonl"  # a folder that does not exist: the write fails
    log.record("b", _answer(1), conversation="c")
    assert log.flush() == 0  # nothing written, nothing lost
    blocked.mkdir()
    assert log.flush() == 1
    log.close()
    assert [t["message"] for t in read_turns(tmp_path / "relative").to_pylist()] == ["a"]
    assert [t["message"] for t in read_turns(blocked).to_pylist()] == ["b"]  # written once it could be


KILLED = """
import os, signal, sys, time
from retrieval.answer import Answer
from retrieval.turn_log import TurnLog
log = TurnLog(sys.argv[1], model="m", table="t", table_version=1, source="serve")
for i in range(50):
    log.record(f"kept {i}", Answer(response="r", bucket=0, confidence=1.0, fallback=False), conversation="c")
time.sleep(1.6)  # past a flush: on disk
log.record("maybe lost", Answer(response="r", bucket=0, confidence=1.0, fallback=False), conversation="c")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_9_loses_at_most_the_last_second_and_the_next_log_seals_the_rest(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert [p.suffix for p in tmp_path.iterdir()] == [".jsonl"]  # never sealed...
    kept = [t["message"] for t in read_turns(tmp_path).to_pylist()]
    assert kept[:50] == [f"kept {i}" for i in range(50)] and len(kept) <= 51  # ...but readable
    TurnLog(tmp_path, model="m", table="t", table_version=1, source="chat").close()  # the next process
    assert [p.suffix for p in tmp_path.iterdir()] == [".parquet"]
    assert [t["message"] for t in read_turns(tmp_path).to_pylist()] == kept


@pytest.mark.slow
def test_chat_and_serve_log_every_turn_beside_the_table_and_no_log_turns_it_off(tmp_path, tiny_records):
    weights, meta = train_chat_model(tmp_path, tiny_records)
    folder = turns_folder(json.loads(Path(meta).read_text())["table"]["db"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BUCKETCHAT_HOME": str(tmp_path / "home")}

    def chat(*extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "interfaces.cli", "chat", "--weights", weights, "--meta", meta, "--json", *extra],
            input="where is my parcel\nhow long do I boil an egg\n",
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    chat()
    turns = read_turns(folder).to_pylist()
    assert [t["message"] for t in turns] == ["where is my parcel", "how long do I boil an egg"]
    assert turns[0]["response"] == INTENTS["track_order"][0] and turns[0]["source"] == "chat"
    assert turns[0]["conversation"] != turns[1]["conversation"]  # piped: each line its own conversation
    assert turns[0]["model"] == weights and turns[0]["table_version"] == json.loads(Path(meta).read_text())["table"]["version"]
    chat("--no_log")
    assert read_turns(folder).num_rows == 2

    port = free_port()
    cmd = [sys.executable, "-m", "interfaces.cli", "serve", "--weights", weights, "--meta", meta, "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    import httpx

    with http_process(cmd, f"{url}/healthz", tmp_path / "serve.log", env=env, cwd=str(ROOT)) as proc:
        ids = []
        for text in ("I forgot my password", "and what about that?"):
            body = {"messages": [{"role": "user", "content": text}], "conversation_id": "web-1"}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert reply.status_code == 200
            ids.append(reply.json()["bucketchat"]["turn_id"])
        assert httpx.post(f"{url}/v1/feedback", json={"turn_id": ids[1], "rating": "bad"}, timeout=30).json() == {"ok": True}
        wrong = httpx.post(f"{url}/v1/feedback", json={"turn_id": ids[1], "rating": "meh"}, timeout=30)
        assert wrong.status_code == 400 and "rating must be one of good, bad" in wrong.text
        proc.send_signal(signal.SIGINT)  # a clean stop: the turns of the last second are written too
        proc.wait(timeout=30)
    served = [t for t in read_turns(folder).to_pylist() if t["source"] == "serve"]
    assert [(t["message"], t["conversation"], t["feedback"]) for t in served] == [
        ("I forgot my password", "web-1", None),
        ("and what about that?", "web-1", "bad"),
    ]
    assert not list(folder.glob("*.jsonl"))  # sealed at the stop
