"""kill -9 at the worst moments, in a real child process (``BUCKETCHAT_FAILPOINT``, models/atomic.py):
what was there before — the table version, the checkpoint, the champion — stays intact and usable,
and running the same step again completes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models import checkpoint
from retrieval.build import build_table
from retrieval.store import latest_complete_version, open_table
from tasks import registry
from tests.conftest import INTENTS, train_chat_model

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BUCKETCHAT_FAILPOINT", None)
    if failpoint:
        env["BUCKETCHAT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _killed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == -signal.SIGKILL


def test_kill_during_db_build_keeps_the_pinned_version_answering(tmp_path, tiny_records):
    from retrieval.answer import ChatEngine, ChatOptions

    weights, meta = train_chat_model(tmp_path, tiny_records)
    pinned = json.loads(Path(meta).read_text())["table"]["version"]
    db = tmp_path / "db"
    rebuild = f"from retrieval.build import build_table; from conversations.records import load_records; p, _ = load_records({str(tmp_path / 'd.jsonl')!r}); build_table(p[:20], {str(db)!r}, 'conversations')"

    assert _killed(_child(rebuild, "db:rows-written"))  # new rows committed, not yet indexed
    engine = ChatEngine(weights, meta, ChatOptions(llm_db=str(db)))  # its own table: the pinned version, searched every turn
    assert engine.answer("I forgot my password").response == INTENTS["reset_password"][0]
    assert open_table(db, "conversations", pinned).count_rows() == 24
    assert latest_complete_version(db, "conversations") == pinned  # training without a version skips the half-built one

    exec(rebuild)  # the rerun completes
    latest = open_table(db, "conversations")
    assert latest.count_rows() == 20 and {str(i.index_type) for i in latest.list_indices()} == {"FTS", "Bitmap"}
    assert open_table(db, "conversations", pinned).count_rows() == 24


TRAIN = "from tasks.training import train_head; from tasks.promotion import register_and_promote; r = train_head.fn({db!r}, 'conversations', {v}, {{'epochs': 4, 'lr': 5e-3, 'seed': 0}}, {{'hidden_dim': 32}}, {out!r}, {meta!r}, None, {resume}); register_and_promote.fn(r['run_id'], {db!r}, 'conversations', r['table_version'], r['val_ids'], r['val_response_acc'])"


@pytest.fixture
def table(tmp_path, tiny_jsonl):
    from conversations.records import load_records

    pairs, _ = load_records(tiny_jsonl)
    return str(tmp_path / "db"), build_table(pairs, tmp_path / "db", "conversations").version


def test_kill_while_a_checkpoint_replaces_the_old_one_keeps_it_and_the_champion(tmp_path, table, mlflow_store):
    db, v = table
    out, meta = str(tmp_path / "model.pth"), str(tmp_path / "meta.json")
    exec(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False))  # the first model, in this process
    before = (Path(out).read_bytes(), Path(meta).read_text())
    assert registry.champion_version() == 1

    # Killed as the new checkpoint was about to replace the old one (a kill mid-training and its
    # --resume: tests/test_training.py).
    assert _killed(_child(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False), "replace:model.pth"))
    assert (Path(out).read_bytes(), Path(meta).read_text()) == before
    checkpoint.load(out, meta)  # loads, and its digest matches
    assert registry.champion_version() == 1 and [x["version"] for x in registry.list_versions()] == [1]

    exec(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False))  # the rerun completes
    assert Path(out).read_bytes() != before[0]
    checkpoint.load(out, meta)
    assert [x["version"] for x in registry.list_versions()] == [2, 1]


def test_kill_during_registry_promotion_keeps_the_champion(tmp_path, table, mlflow_store):
    db, v = table
    out, meta = str(tmp_path / "model.pth"), str(tmp_path / "meta.json")
    # No champion yet: killed just before the alias is set. The version is registered, nothing serves.
    assert _killed(_child(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False), "registry:promoting"))
    assert registry.champion_version() is None and [x["version"] for x in registry.list_versions()] == [1]
    exec(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False))  # the rerun completes
    assert registry.champion_version() == 2

    # Killed between registering v3 and deciding on it: the champion stays v2 and still loads.
    assert _killed(_child(TRAIN.format(db=db, v=v, out=out, meta=meta, resume=False), "registry:registered"))
    assert registry.champion_version() == 2
    weights, meta_path = registry.download_model("models:/bucketchat@champion", tmp_path / "dl")
    checkpoint.load(weights, meta_path)
    versions = {x["version"]: x for x in registry.list_versions()}
    assert sorted(versions) == [1, 2, 3] and versions[3]["promotion"] is None and versions[2]["aliases"] == ["champion"]


def test_a_registration_killed_past_registering_and_retried_leaves_one_version(tmp_path, table, mlflow_store):
    """What a task retry does after a failure past registration: the same run registered again."""
    from tasks.promotion import register_and_promote
    from tasks.training import train_head

    db, v = table
    r = train_head.fn(db, "conversations", v, {"epochs": 4, "lr": 5e-3, "seed": 0}, {"hidden_dim": 32})
    promote = (
        "from tasks.promotion import register_and_promote; "
        f"register_and_promote.fn({r['run_id']!r}, {db!r}, 'conversations', {r['table_version']}, {r['val_ids']!r}, {r['val_response_acc']!r})"
    )
    assert _killed(_child(promote, "registry:registered"))
    assert [x["version"] for x in registry.list_versions()] == [1] and registry.champion_version() is None

    again = register_and_promote.fn(r["run_id"], db, "conversations", r["table_version"], r["val_ids"], r["val_response_acc"])
    assert again["version"] == 1 and again["promoted"]
    versions = registry.list_versions()
    assert [(x["version"], x["run_id"], x["aliases"]) for x in versions] == [(1, r["run_id"], ["champion"])]
