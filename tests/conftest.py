"""Shared fixtures: real components in temp dirs (LanceDB, MLflow, Prefect), tiny deterministic data."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect (through ``tasks``): keep Prefect's home and every default workdir
# out of the project and out of ~/.prefect. Once per process: a test that imports ``tests.conftest``
# (a second module object beside pytest's ``conftest``) must not undo what its fixtures set, such as
# MLFLOW_TRACKING_URI (that sent one test's runs to the project's own store).
if "BUCKETCHAT_TEST_STATE" not in os.environ:
    os.environ["BUCKETCHAT_TEST_STATE"] = tempfile.mkdtemp(prefix="bucketchat-tests-")
    os.environ["BUCKETCHAT_HOME"] = os.environ["BUCKETCHAT_TEST_STATE"]
    os.environ["PREFECT_HOME"] = os.path.join(os.environ["BUCKETCHAT_TEST_STATE"], "prefect")
    os.environ["BUCKETCHAT_ENCODER_CACHE"] = os.path.join(os.environ["BUCKETCHAT_TEST_STATE"], "encoders")
    os.environ["BUCKETCHAT_CACHE"] = os.path.join(os.environ["BUCKETCHAT_TEST_STATE"], "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
_STATE = os.environ["BUCKETCHAT_TEST_STATE"]
# Prefect's console handler would log "stopping temporary server" into pytest's already-closed
# capture stream at session end; tests assert on results, not on Prefect's INFO lines.
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# What the `bucketchat` command does first, before anything here imports prefect.
from tasks.settings import apply_environment  # noqa: E402

apply_environment()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "conversation_data.sample.jsonl"

# Four clearly different intents, six askings each: small enough to embed in a second, big enough
# that a head must actually learn to separate them.
INTENTS = {
    "reset_password": (
        "Use Settings > Security > Reset password; the emailed link works for 30 minutes.",
        [
            "How do I reset my password?",
            "I forgot my password",
            "password reset please",
            "can't remember my login password",
            "I need a new password",
            "locked out, forgot my password",
        ],
    ),
    "track_order": (
        "Track your order under Orders > Track; the tracking number appears once it ships.",
        [
            "Where is my order?",
            "how do I track my package",
            "has my parcel shipped yet",
            "delivery status of my order",
            "when will my package arrive",
            "I want a tracking number",
        ],
    ),
    "boil_egg": (
        "Boil eggs 6 minutes for a soft yolk, 9 minutes for hard, then cool them in cold water.",
        [
            "How long do I boil an egg?",
            "soft boiled egg time",
            "how to make hard boiled eggs",
            "minutes to boil eggs",
            "perfect boiled egg timing",
            "how long for a runny yolk",
        ],
    ),
    "undo_commit": (
        "Run `git reset --soft HEAD~1` to undo the last commit and keep its changes.",
        [
            "How do I undo my last commit?",
            "revert the last git commit",
            "I committed by mistake",
            "undo git commit keep changes",
            "remove the most recent commit",
            "go back one commit in git",
        ],
    ),
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def tiny_records() -> list[dict]:
    return [{"user": u, "assistant": resp, "intent": name} for name, (resp, asks) in INTENTS.items() for u in asks]


@pytest.fixture
def tiny_jsonl(tmp_path, tiny_records) -> Path:
    multi = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi, where is my parcel?"},
            {"role": "assistant", "content": INTENTS["track_order"][0]},
            {"role": "user", "content": "and how long should I boil eggs?"},
            {"role": "assistant", "content": INTENTS["boil_egg"][0]},
        ]
    }
    return write_jsonl(tmp_path / "tiny.jsonl", tiny_records + [multi])


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store + registry in this test's temp dir."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def make_tiny_encoder(folder: Path, words: list[str]) -> Path:
    """A sentence-transformers model built offline: a one-layer BERT with random (seeded) weights,
    a vocabulary of ``words``, mean pooling and unit length, saved as a user would bring it."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    raw = folder / "bert"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    (raw / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    BertModel(config).save_pretrained(raw)
    BertTokenizerFast(vocab_file=str(raw / "vocab.txt")).save_pretrained(raw)
    out = folder / "tiny-encoder"
    SentenceTransformer(modules=[models.Transformer(str(raw)), models.Pooling(32, "mean"), models.Normalize()]).save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    words = [w.strip("?,.!'").lower() for asks in INTENTS.values() for u in asks[1] for w in u.split()]
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder"), words)


@pytest.fixture(scope="session")
def prefect_harness():
    """Real Prefect flow runs against a temporary local API, results kept in a temp dir."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as storage, temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness) -> dict[str, str]:
    """Environment for a child `bucketchat` process to use the harness's API server instead of
    starting its own temporary one (~10 s each, and one a killed child would leave running)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


def train_chat_model(folder: Path, records: list[dict]) -> tuple[str, str]:
    """Build a table of ``records`` in ``folder`` and fit a small head that learns one response per
    bucket (the rest only retrieval reaches); returns (weights, meta). Validation is off, so the
    fallback thresholds are 0 unless a test sets them."""
    from conversations.records import load_records
    from models import checkpoint
    from models.config import HeadSettings, TrainConfig
    from retrieval.build import build_table
    from tasks.fitting import fit

    pairs, _ = load_records(write_jsonl(folder / "d.jsonl", records))
    res = build_table(pairs, folder / "db", "conversations")
    head, meta, _ = fit(
        str(folder / "db"),
        "conversations",
        res.version,
        TrainConfig(epochs=40, lr=5e-3, val_split=0.0, max_candidates_per_bucket=1),
        HeadSettings(hidden_dim=64, dropout=0.0),
    )
    checkpoint.save(head, meta, folder / "w.safetensors", folder / "m.json")
    return str(folder / "w.safetensors"), str(folder / "m.json")


GIFT_CARDS = "Yes, gift cards from 10 to 200 euros are in the shop."


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> tuple[str, str]:
    """INTENTS plus one rare, unlabelled-for-the-head response (gift cards, one asking) that only
    retrieval can return; shared by the chat, eval and server tests."""
    records = [{"user": u, "assistant": resp, "intent": name} for name, (resp, asks) in INTENTS.items() for u in asks]
    records.append({"user": "do you sell gift cards", "assistant": GIFT_CARDS, "intent": "track_order"})
    return train_chat_model(tmp_path_factory.mktemp("chat_model"), records)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_process(cmd: list[str], health: str, log: Path, env: dict | None = None, cwd: str | None = None, timeout: float = 60):
    """A server in its own process (output to ``log``, so a full pipe can never block it), yielded
    once ``health`` answers 200 and stopped after; fails with the log's tail if it never comes up."""
    import subprocess
    import time

    import httpx

    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(health, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{cmd[0]} did not come up at {health}:\n" + log.read_text(errors="replace")[-2000:])
                time.sleep(0.25)
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def running_server(engine, cfg=None):
    """The real server (uvicorn, loopback, a free port) in a background thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from interfaces.server import ServerConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cfg or ServerConfig()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
