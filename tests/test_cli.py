"""The command line: help for every command, both flag spellings, errors with the fix, chat batch mode."""

import io
import json
import subprocess
import sys

import pytest

from flows.cli import build_parser, main
from models import checkpoint
from models.train import TrainConfig
from retrieval.store import build_table
from tasks.records import load_records
from tasks.training import fit

COMMANDS = [["expand"], ["build-super"], ["db", "build"], ["db", "stats"], ["finetune"], ["chat"], ["pipeline"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    assert "usage: bucketchat " + " ".join(cmd) in capsys.readouterr().out


def test_seed_flags_parse_in_snake_and_kebab_case():
    p = build_parser()
    a = p.parse_args(["expand", "--input", "i", "--output", "o", "--target", "5", "--creative_prob", "0.4", "--blend-prob", "0.2", "--seed", "1"])
    assert (a.creative_prob, a.blend_prob, a.seed) == (0.4, 0.2, 1)
    a = p.parse_args(["chat", "--pool_mode", "all", "--response-temperature", "0.1", "--top_labels", "4", "--llm_db", "x.db", "--db-top-k", "120"])
    assert (a.pool_mode, a.response_temperature, a.top_labels, a.llm_db, a.db_top_k) == ("all", 0.1, 4, "x.db", 120)


def test_bad_input_exits_2_with_a_message_naming_the_fix(tmp_path, capsys):
    assert main(["expand", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--target", "5"]) == 2
    assert "missing.jsonl' does not exist; check the path" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "u", "assistant": "a"}\n{"user": "u"}\n')
    assert main(["pipeline", "--data", str(bad), "--workdir", str(tmp_path / "w"), "--strict"]) == 2
    assert capsys.readouterr().err.strip() == f"""bucketchat pipeline: error: {bad}:2: missing field 'assistant'. Fix: give both "user" and "assistant", or a "messages" list"""
    assert not (tmp_path / "w").exists()  # nothing was started
    assert main(["finetune", "--epochs", "0", "--db", str(tmp_path / "db")]) == 2
    assert "--epochs=0 is invalid" in capsys.readouterr().err
    assert main(["chat", "--weights", "w.pth"]) == 2
    assert "--weights and --meta go together" in capsys.readouterr().err


def test_chat_answers_each_piped_line_as_json(tmp_path, tiny_jsonl, monkeypatch, capsys):
    pairs, _ = load_records(tiny_jsonl)
    res = build_table(pairs, tmp_path / "db", "conversations")
    head, meta, _ = fit(str(tmp_path / "db"), "conversations", res.version, TrainConfig(epochs=30, lr=5e-3, val_split=0.0), {"hidden_dim": 64, "dropout": 0.0})
    checkpoint.save(head, meta, tmp_path / "w.pth", tmp_path / "m.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO("where is my parcel\n\nhow long to boil eggs\n"))
    assert main(["chat", "--weights", str(tmp_path / "w.pth"), "--meta", str(tmp_path / "m.json"), "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["line"] for l in lines] == [1, 3]
    assert {"response", "bucket", "confidence", "fallback", "candidates", "latency_ms"} <= set(lines[0])
    assert lines[0]["response"].startswith("Track your order") and lines[1]["response"].startswith("Boil eggs")


def test_console_script_is_installed():
    from pathlib import Path

    # Next to the interpreter: `make test` runs .venv/bin/python without activating the venv.
    out = subprocess.run([str(Path(sys.executable).parent / "bucketchat"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "pipeline" in out and "chat" in out
