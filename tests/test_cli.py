"""The command line: help for every command, both flag spellings, errors with the fix, chat batch mode."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conversations.records import load_records
from interfaces.cli import build_parser, main
from models import checkpoint
from models.config import HeadSettings, TrainConfig
from retrieval.build import build_table
from tasks.fitting import fit

COMMANDS = [
    ["expand"],
    ["build-super"],
    ["db", "build"],
    ["db", "stats"],
    ["finetune"],
    ["size-sweep"],
    ["registry", "list"],
    ["registry", "rollback"],
    ["chat"],
    ["eval"],
    ["serve"],
    ["pipeline"],
]

# The seed README's finetune lines, verbatim but for `python finetune_chat.py` -> `bucketchat finetune`.
SEED_FINETUNE = [
    "--data conversation_data.sample.jsonl --device cpu",
    "--data conversation_data.massive.jsonl --weights champion_model_chat_large_ft_v3.pth --model_size large --train_all --balanced_sampler --split_mode stratified --pref_weight 0.22 --pref_beta 2.5 --pref_warmup_epochs 1.0 --hard_negative_ratio 0.7 --label_smoothing 0.05 --adaptive_pref_weighting --lr_schedule cosine --warmup_steps 400 --early_stop_patience 2 --epochs 2 --batch_size 128 --device cpu --output champion_model_chat_large_ft_v4.pth --meta chat_model_large_meta_v4.json",
    "--data conversation_data.massive.jsonl --weights champion_model_chat_large_ft_v4.pth --model_size xlarge --expansion_dim 896 --extra_expansion_dim 1536 --train_all --balanced_sampler --pref_weight 0.24 --pref_beta 2.8 --hard_negative_ratio 0.75 --adaptive_pref_weighting --epochs 2 --batch_size 128 --device cpu --output champion_model_chat_xlarge_ft_v1.pth --meta chat_model_xlarge_meta_v1.json",
    "--data conversation_data.super_v7.jsonl --weights champion_model_chat_large_ft_v6.pth --model_size xxlarge --expansion_dim 1024 --extra_expansion_dim 2048 --third_expansion_dim 3072 --train_all --balanced_sampler --split_mode stratified --val_split 0.08 --grad_accum_steps 4 --ema_decay 0.999 --pref_weight 0.24 --pref_beta 2.8 --pref_objective sigmoid --pref_group_size 4 --pref_group_estimator epo --hard_negative_ratio 0.78 --adaptive_pref_weighting --pref_warmup_epochs 1.2 --label_smoothing 0.04 --lr 0.00012 --lr_schedule cosine --warmup_steps 260 --early_stop_patience 2 --epochs 2 --batch_size 128 --device cpu --max_candidates_per_bucket 320 --output champion_model_chat_xxlarge_ft_v1.pth --meta chat_model_xxlarge_meta_v1.json",
    "--data conversation_data.hybrid_v5_clean.jsonl --weights champion_model_chat_large_ft_v5.pth --model_size large --train_all --balanced_sampler --split_mode stratified --val_split 0.08 --pref_weight 0.22 --pref_beta 2.6 --pref_objective sigmoid --pref_group_size 4 --pref_group_estimator epo --hard_negative_ratio 0.78 --adaptive_pref_weighting --pref_warmup_epochs 1.2 --label_smoothing 0.04 --lr 0.00014 --lr_schedule cosine --warmup_steps 180 --early_stop_patience 2 --epochs 2 --batch_size 128 --device cpu --max_candidates_per_bucket 224 --output champion_model_chat_large_ft_v6.pth --meta chat_model_large_meta_v6.json",
]


# The seed README's chat lines, verbatim but for `python chat_app.py` -> `bucketchat chat`.
SEED_CHAT = [
    "--weights champion_model_chat_ft.pth --meta chat_model_meta.json --device cpu",
    "--weights champion_model_chat_large_ft_v4.pth --meta chat_model_large_meta_v4.json --device cpu --pool_mode all --response_temperature 0.10 --top_labels 4 --llm_db llm_chat.db --db_top_k 120",
    "--weights champion_model_chat_xlarge_ft_v1.pth --meta chat_model_xlarge_meta_v1.json --model_size auto --pool_mode all --llm_db llm_chat.db --db_top_k 160 --style_mode auto --creativity 0.35 --response_temperature 0.12",
    "--weights champion_model_chat_xxlarge_ft_v1.pth --meta chat_model_xxlarge_meta_v1.json --model_size auto --pool_mode all --llm_db llm_chat_v6.db --db_top_k 180 --style_mode auto --creativity 0.30 --response_temperature 0.08",
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    assert "usage: bucketchat " + " ".join(cmd) in capsys.readouterr().out


def test_seed_flags_parse_in_snake_and_kebab_case():
    p = build_parser()
    a = p.parse_args(
        ["expand", "--input", "i", "--output", "o", "--target", "5", "--creative_prob", "0.4", "--blend-prob", "0.2", "--seed", "1"]
    )
    assert (a.creative_prob, a.blend_prob, a.seed) == (0.4, 0.2, 1)
    a = p.parse_args(
        ["chat", "--pool_mode", "all", "--response-temperature", "0.1", "--top_labels", "4", "--llm_db", "x.db", "--db-top-k", "120"]
    )
    assert (a.pool_mode, a.response_temperature, a.top_labels, a.llm_db, a.db_top_k) == ("all", 0.1, 4, "x.db", 120)


@pytest.mark.parametrize("line", SEED_FINETUNE, ids=lambda l: l.split("--output ")[-1].split()[0] if "--output" in l else "sample")
def test_every_seed_finetune_line_parses_and_validates(line):
    from interfaces.flags import run_config

    a = build_parser().parse_args(["finetune", *line.split()])
    train, head = run_config(a)
    assert train.device == "cpu" and head.model_size in ("base", "large", "xlarge", "xxlarge")


def test_bad_input_exits_2_with_a_message_naming_the_fix(tmp_path, capsys):
    assert main(["expand", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--target", "5"]) == 2
    assert "missing.jsonl' does not exist; check the path" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "u", "assistant": "a"}\n{"user": "u"}\n')
    assert main(["pipeline", "--data", str(bad), "--workdir", str(tmp_path / "w"), "--strict"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"""bucketchat pipeline: error: {bad}:2: missing field 'assistant'. Fix: give both "user" and "assistant", or a "messages" list"""
    )
    assert not (tmp_path / "w").exists()  # nothing was started
    assert main(["finetune", "--epochs", "0", "--db", str(tmp_path / "db")]) == 2
    assert "--epochs=0 is invalid" in capsys.readouterr().err
    assert main(["chat", "--weights", "w.pth"]) == 2
    assert "--weights and --meta go together" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "empty",
            'is empty; it needs conversations: one JSON object per line (.jsonl), e.g. {"user": "hi", "assistant": "hello"}, or a table (.csv, .parquet) with a row per pair',
        ),
        (
            "folder",
            "is a folder, not a file; pass a conversation file (.jsonl, .json, .csv, .parquet) (for a folder of drops use `bucketchat retrain --data_dir {path}`)",
        ),
        (
            "garbage",
            "holds no usable conversation: all 4 of its non-blank records were rejected, the first at line 1: invalid UTF-8 at byte 0. Fix: save the input as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE`)",
        ),
        ("missing", "does not exist; check the path"),
    ],
)
@pytest.mark.parametrize("command", ["pipeline", "finetune", "db build"])
def test_unusable_data_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case, message, command):
    path = tmp_path / "in" / f"{case}.jsonl"
    path.parent.mkdir()
    if case == "empty":
        path.write_bytes(b"\n  \n")
    elif case == "folder":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"\xff\xfe\x00\n\x89PNG\r\n\x1a\n\x00\x00\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    args = {
        "pipeline": ["pipeline", "--data", str(path), "--workdir", str(out / "w")],
        "finetune": ["finetune", "--data", str(path)],
        "db build": ["db", "build", "--data", str(path), "--db", str(out / "db")],
    }[command]
    assert main(args) == 2
    expected = message.replace("{path}", str(path))
    assert capsys.readouterr().err == f"bucketchat {args[0]}: error: --data {str(path)!r} {expected}\n"
    assert list(out.iterdir()) == []  # no rejects file, no table, no workdir: nothing was started


def test_chat_answers_each_piped_line_as_json(tmp_path, tiny_jsonl, monkeypatch, capsys):
    pairs, _ = load_records(tiny_jsonl)
    res = build_table(pairs, tmp_path / "db", "conversations")
    head, meta, _ = fit(
        str(tmp_path / "db"),
        "conversations",
        res.version,
        TrainConfig(epochs=30, lr=5e-3, val_split=0.0),
        HeadSettings(hidden_dim=64, dropout=0.0),
    )
    checkpoint.save(head, meta, tmp_path / "w.pth", tmp_path / "m.json")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"where is my parcel\n\nhow long to boil eggs\n")))
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


@pytest.mark.slow
def test_seed_finetune_lines_run_as_written(tmp_path, tiny_records, monkeypatch, mlflow_store, prefect_harness, capsys):
    """The seed README's five finetune command lines, in the order their checkpoints feed each other, on
    tiny stand-ins for the seed's data files; then the chat lines' checkpoints answer."""
    import shutil
    from pathlib import Path

    from tests.conftest import write_jsonl

    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parents[1] / "conversation_data.sample.jsonl", tmp_path)
    for name in ("conversation_data.massive.jsonl", "conversation_data.super_v7.jsonl", "conversation_data.hybrid_v5_clean.jsonl"):
        write_jsonl(tmp_path / name, tiny_records)
    assert main(["finetune", *SEED_FINETUNE[0].split(), "--epochs", "5"]) == 0  # the sample at defaults, shortened
    # The seed's warm-start inputs v3 and v5 are earlier checkpoints; the sample model stands in.
    for name in ("champion_model_chat_large_ft_v3.pth", "champion_model_chat_large_ft_v5.pth"):
        shutil.copy("champion_model_chat_ft.pth", name)
    for i in (1, 2, 4, 3):  # v4 <- v3, xlarge <- v4, v6 <- v5, xxlarge <- v6
        assert main(["finetune", *SEED_FINETUNE[i].split()]) == 0, SEED_FINETUNE[i]
    out = capsys.readouterr().out
    assert out.count("registered bucketchat v") == 5
    # large -> xlarge and large -> xxlarge keep every tensor; the sample model shares no responses with
    # the stand-in data, so only its candidate rows are skipped, and the report says why.
    assert "warm start from champion_model_chat_large_ft_v4.pth: " in out and out.count("none skipped") == 2
    assert out.count("2 skipped: candidate.bias (no shared responses); candidate.weight (no shared responses)") == 2
    for weights, meta in (
        ("champion_model_chat_xlarge_ft_v1.pth", "chat_model_xlarge_meta_v1.json"),
        ("champion_model_chat_xxlarge_ft_v1.pth", "chat_model_xxlarge_meta_v1.json"),
    ):
        saved = json.loads(Path(meta).read_text())
        assert saved["warm_start"]["skipped"] == []  # large (768) -> xlarge (896): widened, not dropped
        assert Path(weights).with_suffix(".encoder").is_dir()  # --train_all: the encoder travels with the head
    assert json.loads(Path("chat_model_xxlarge_meta_v1.json").read_text())["head_config"]["third_expansion_dim"] == 3072
    # The seed's v6 database is the table its recipe trained on (re-embedded by the fine-tuned encoder).
    shutil.copytree("llm_chat.db", "llm_chat_v6.db")
    for line in SEED_CHAT:
        monkeypatch.setattr(sys, "stdin", io.StringIO("where is my parcel\n"))
        capsys.readouterr()
        assert main(["chat", *line.split(), "--json"]) == 0, line
        answer = json.loads(capsys.readouterr().out)
        assert answer["response"] and answer["style"] in ("balanced", "concise", "analyst", "creative")


def test_every_seed_chat_line_parses(tmp_path):
    from retrieval.answer import ChatOptions

    for line in SEED_CHAT:
        a = build_parser().parse_args(["chat", *line.split()])
        ChatOptions(
            device=a.device,
            model_size=a.model_size,
            pool_mode=a.pool_mode,
            top_labels=a.top_labels,
            response_temperature=a.response_temperature,
            llm_db=a.llm_db,
            db_top_k=a.db_top_k,
            style_mode=a.style_mode,
            creativity=a.creativity,
        )
    a = build_parser().parse_args(["chat", *SEED_CHAT[3].split()])
    assert (a.model_size, a.style_mode, a.creativity, a.response_temperature, a.db_top_k) == ("auto", "auto", 0.30, 0.08, 180)


def _repl(monkeypatch, capsys, argv: list[str], typed: str) -> str:
    """Run `bucketchat chat` as if on a terminal, typing ``typed``."""
    tty = io.StringIO(typed)
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", tty)
    capsys.readouterr()
    assert main(["chat", *argv]) == 0
    return capsys.readouterr().out


def test_repl_keeps_history_and_has_why_reset_help(chat_model, monkeypatch, capsys):
    from tests.conftest import INTENTS

    w, m = chat_model
    out = _repl(
        monkeypatch,
        capsys,
        ["--weights", w, "--meta", m],
        "/help\n/good\nwhere is my order?\nand what about that?\n/why\n/bad\n/reset\n/why\n/bogus\nexit\n",
    )
    assert "(nothing to rate: no answer yet" in out and "(noted: bad)" in out
    assert "/why" in out and "/reset" in out  # help
    assert out.count(f"bot> {INTENTS['track_order'][0]}") == 2  # the follow-up was read with the previous turn
    assert "read as a follow-up of: 'where is my order?'" in out
    assert "buckets: " in out and "[learned, bucket" in out and "from d:" in out  # the why, with source records
    assert "(conversation reset)" in out and "(nothing answered yet)" in out
    assert "unknown command /bogus; /help lists them" in out


def test_eval_reports_accuracy_fallback_oos_and_latency(chat_model, tmp_path, capsys):
    from tests.conftest import INTENTS, write_jsonl

    w, m = chat_model
    test = write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"user": q, "assistant": r}
            for q, r in [
                ("I can't log in, I forgot the password", INTENTS["reset_password"][0]),
                ("where's my package right now", INTENTS["track_order"][0]),
                ("how many minutes should eggs boil", INTENTS["boil_egg"][0]),
                ("how can I undo a git commit", INTENTS["track_order"][0]),
            ]
        ],
    )
    oos = tmp_path / "oos.txt"
    oos.write_text("what is the capital of peru\nsing me a song\n")
    assert main(["eval", "--data", str(test), "--oos", str(oos), "--weights", w, "--meta", m, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["messages"] == 4 and r["response_accuracy"] == 0.75 and r["ranking_accuracy"] == 0.75
    assert r["bucket_accuracy"] == 0.75 and r["fallback_rate"] == 0.0  # thresholds are 0 for this model
    curve = r["oos"].pop("tradeoff")
    assert r["oos"] == {"data": str(oos), "messages": 2, "recall": 0.0}
    # The curve a threshold is picked from: no gate answers as now, the strictest catches everything.
    assert curve[0] == {"min_similarity": 0.0, "in_scope_accuracy": 0.75, "oos_recall": 0.0}
    assert curve[-1]["oos_recall"] == 1.0 and curve[-1]["in_scope_accuracy"] < 0.75
    assert [p["min_similarity"] for p in curve] == sorted(p["min_similarity"] for p in curve)
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert main(["eval", "--data", str(test), "--oos", str(oos), "--weights", w, "--meta", m, "--min_confidence", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "response accuracy    0.00%" in text and "out-of-scope recall  100.00%" in text and "fallback rate        100.00%" in text


@pytest.mark.parametrize(
    "args",
    [
        ["pipeline", "--data", "x.jsonl", "--epochs", "0"],
        ["finetune", "--model_size", "huge"],
        ["chat", "--bogus"],
        ["pipeline", "--data", "no/such/file.csv"],
        ["db", "build", "--data", "no/such/file.jsonl", "--db", "x.db"],
        ["eval", "--data", "no/such/test.jsonl"],
    ],
)
def test_a_flag_error_loads_no_torch_prefect_or_mlflow(args):
    """An argument error (a bad flag, a missing --data file) is the parser's, the run config's and the
    input check's: answered before anything heavy loads (tests/bench/startup.py times it)."""
    code = (
        "import sys\nfrom interfaces.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'lancedb') if m in sys.modules), code)"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert out.stdout.strip().splitlines()[-1] == "[] 2"
    assert "error" in out.stderr


@pytest.mark.slow
def test_a_csv_export_trains_quietly_and_answers_as_the_readme_says(tmp_path, tiny_records, prefect_api_env):
    """The README's "your own data" lines on a help-desk style CSV: the pipeline prints its summary and
    nothing else (Prefect's and MLflow's logs are in the log file the summary names), then chat answers
    from the champion it registered."""
    import csv
    import os

    from tests.conftest import INTENTS

    export = tmp_path / "export.csv"
    with open(export, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ticket", "question", "reply", "topic"])
        writer.writerows([i, r["user"], r["assistant"], r["intent"]] for i, r in enumerate(tiny_records))
    env = {
        **os.environ,
        **prefect_api_env,
        "BUCKETCHAT_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_LOGGING_LEVEL": "INFO",  # the suite's own setting is WARNING
    }
    bucketchat = str(Path(sys.executable).parent / "bucketchat")
    cols = ["--user_col", "question", "--assistant_col", "reply", "--label_col", "topic"]
    done = subprocess.run(
        [bucketchat, "pipeline", "--data", str(export), *cols, "--epochs", "5"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line.split(":")[0].split(" ")[0] for line in lines] == ["dataset", "table", "trained", "MLflow", "workdir", "done"]
    assert lines[0].startswith(f"dataset: {len(tiny_records)} pairs")
    log = Path(lines[-1].split("log: ")[1])
    assert log.parent == tmp_path / "home" / "logs"
    text = log.read_text()
    assert "Beginning flow run" in text and "epoch 5:" in text
    asked = subprocess.run(
        [bucketchat, "chat", "--json"], input="where is my parcel\n", env=env, capture_output=True, text=True, timeout=120
    )
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["response"] == INTENTS["track_order"][0]
