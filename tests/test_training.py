"""Fit on a real table, log to a real MLflow store, register, and promote only when better."""

import json

import pytest
import torch

import mlflow
from conversations.records import load_records
from models.config import HeadSettings, TrainConfig
from retrieval.build import build_table
from retrieval.encoder import INT8_ID
from retrieval.store import open_table, read_columns
from tasks import registry
from tasks.fitting import fit, ids_digest
from tasks.promotion import register_and_promote, response_accuracy
from tasks.training import train_head
from tests.conftest import INTENTS, write_jsonl


def load_records_list(records: list[dict]) -> list:
    """Records -> the pairs ``build_table`` takes, through the real loader."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return load_records(write_jsonl(Path(tmp) / "records.jsonl", records))[0]


@pytest.fixture
def table(tmp_path, tiny_jsonl):
    pairs, _ = load_records(tiny_jsonl)
    res = build_table(pairs, tmp_path / "db", "conversations")
    return str(tmp_path / "db"), "conversations", res.version


def test_fit_meta_pins_table_and_explains_the_model(table):
    db, name, version = table
    head, meta, val = fit(db, name, version, TrainConfig(epochs=30, lr=5e-3, val_split=0.2), HeadSettings(hidden_dim=64, dropout=0.0))
    assert meta["table"]["name"] == name and meta["table"]["version"] == version
    assert sorted(meta["candidates"]["texts"]) == sorted(resp for resp, _ in INTENTS.values())
    assert meta["all_responses_learned"] is True
    assert len(val["ids"]) == 4  # round(6 * 0.2) = 1 per intent (the 7-row intents also give 1)
    assert val["accuracy"] == 1.0
    # 4 validation rows cannot certify a 0.25 % loss: half the least confident right answer.
    assert 0.0 < meta["calibration"]["min_confidence"] <= 0.5


def test_the_fallback_is_calibrated_on_answers_with_the_neighbour_vote(table):
    """Validation rows are answered as chat will answer them: the head's p(response) with the vote of
    their nearest *training* rows mixed in; the thresholds and the reported answer accuracy use that."""
    import numpy as np

    from models.calibration import answered_right, calibrate_similarity, calibrate_thresholds
    from retrieval.neighbours import neighbour_log_probs
    from retrieval.table_rows import table_rows

    db, name, version = table
    head, meta, val = fit(db, name, version, TrainConfig(epochs=3, lr=5e-3, val_split=0.2, refit=False), HeadSettings(hidden_dim=32))
    assert meta["neighbours"] == {"weight": 0.2, "k": 10, "temperature": 0.05}
    rows = table_rows(db, name, version)
    where = {i: n for n, i in enumerate(rows["ids"])}
    va = np.array([where[i] for i in val["ids"]])
    tr = np.setdiff1d(np.arange(len(rows["ids"])), va)
    with torch.no_grad():
        _, alone = head.response_log_probs(torch.from_numpy(rows["vectors"][va]), head.lex([rows["users"][i] for i in va]))
    slots = np.array([meta["candidates"]["texts"].index(rows["responses"][i]) for i in tr])
    expected = neighbour_log_probs(alone.numpy(), rows["vectors"][va], rows["vectors"][tr], slots, 0.2)
    np.testing.assert_allclose(val["log_pr"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, alone.numpy())
    calibrated = calibrate_thresholds(val["log_pr"], val["y_val"], head.candidate_learned, keep=1 - 0.005 / 2)
    assert {k: meta["calibration"][k] for k in calibrated} == calibrated
    right = answered_right(val["log_pr"].argmax(1), val["y_val"], head.candidate_learned)
    # The similarity gate: each validation message against its nearest training message.
    nearest_sim = (rows["vectors"][va] @ rows["vectors"][tr].T).max(1)
    assert meta["calibration"]["min_similarity"] == pytest.approx(
        calibrate_similarity(torch.from_numpy(nearest_sim), right, keep=1 - 0.005 / 2), abs=1e-6
    )
    assert 0.0 < meta["calibration"]["min_similarity"] < 1.0
    assert meta["metrics"]["val_answer_acc"] == pytest.approx(float(right.float().mean()))


def test_same_data_and_seed_give_the_same_model(table):
    db, name, version = table
    cfg = TrainConfig(epochs=3, lr=5e-3, val_split=0.2)
    a, _, _ = fit(db, name, version, cfg, HeadSettings(hidden_dim=32))
    b, _, _ = fit(db, name, version, cfg, HeadSettings(hidden_dim=32))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_refit_ships_a_model_trained_on_every_row(table):
    db, name, version = table
    head, meta, val = fit(db, name, version, TrainConfig(epochs=6, lr=5e-3, val_split=0.2), HeadSettings(hidden_dim=32))
    # 4 validation rows are too few to pick an epoch: the whole schedule, then a refit on all 26 rows.
    assert meta["train_config"]["select_metric"] == "last" and meta["metrics"]["best_epoch"] == 6
    assert (meta["refit"]["rows"], meta["refit"]["epochs"]) == (26, 6) and meta["metrics"]["refit_rows"] == 26
    # The scores are the held-out run's, row by row.
    assert len(val["right"]) == len(val["ids"]) == 4 and sum(val["right"]) / 4 == val["accuracy"]
    assert meta["validation"] == {"rows": 4, "ids_digest": ids_digest(val["ids"]), "held_out_of_shipped_model": False}
    # Trained on every row for the chosen epochs from the same start: exactly a run without validation.
    everything, _, _ = fit(db, name, version, TrainConfig(epochs=6, lr=5e-3, val_split=0.0), HeadSettings(hidden_dim=32))
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), everything.state_dict().values()))
    held_out, meta_off, _ = fit(db, name, version, TrainConfig(epochs=6, lr=5e-3, val_split=0.2, refit=False), HeadSettings(hidden_dim=32))
    assert meta_off["refit"] is None and meta_off["validation"]["held_out_of_shipped_model"] is True
    assert not all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), held_out.state_dict().values()))


def test_a_refit_champion_is_scored_only_on_rows_it_never_trained_on(tmp_path, tiny_records, mlflow_store, prefect_harness):
    db = str(tmp_path / "db")
    v1 = build_table(load_records_list(tiny_records), db, "conversations").version
    first = train_head.fn(db, "conversations", v1, {"epochs": 20, "lr": 5e-3, "val_split": 0.3}, {"hidden_dim": 32})
    assert register_and_promote.fn(
        first["run_id"], db, "conversations", v1, first["val_ids"], first["val_response_acc"], val_right=first["val_right"]
    )["promoted"]
    # The same data again: the refit champion saw every validation row, so the two held-out scores
    # recorded at training are compared (equal here: same data and seed), and the champion stays.
    again = train_head.fn(db, "conversations", v1, {"epochs": 20, "lr": 5e-3, "val_split": 0.3}, {"hidden_dim": 32})
    same = register_and_promote.fn(
        again["run_id"], db, "conversations", v1, again["val_ids"], again["val_response_acc"], val_right=again["val_right"]
    )
    assert not same["promoted"] and f"the same {len(again['val_ids'])} validation rows, both held out at training" in same["reason"]
    # New rows arrive: only the validation rows the champion never trained on count.
    grown = tiny_records + [{**r, "user": f"hey, {r['user']} please"} for r in tiny_records]
    v2 = build_table(load_records_list(grown), db, "conversations").version
    new = train_head.fn(db, "conversations", v2, {"epochs": 20, "lr": 5e-3, "val_split": 0.3}, {"hidden_dim": 32})
    unseen = [i for i in new["val_ids"] if i not in set(read_columns(open_table(db, "conversations", v1), ["id"])["id"].to_pylist())]
    assert 0 < len(unseen) < len(new["val_ids"])
    result = register_and_promote.fn(
        new["run_id"], db, "conversations", v2, new["val_ids"], new["val_response_acc"], val_right=new["val_right"]
    )
    assert f"on {len(unseen)} validation rows the refit champion never trained on" in result["reason"]


def test_a_refit_champion_whose_table_version_is_gone_is_compared_only_on_recorded_scores(table, tmp_path):
    from retrieval.locations import db_key
    from tasks.promotion import champion_score

    db, name, version = table
    val_ids = read_columns(open_table(db, name, version), ["id"])["id"].to_pylist()[:5]
    meta = {
        "refit": {"rows": 40, "epochs": 3},
        "table": {"db": db_key(db), "name": name, "trained_on_version": 999},
        "metrics": {"val_response_acc": 0.8},
        "validation": {"ids_digest": ids_digest(val_ids)},
    }
    path = tmp_path / "champion.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    # Version 999 is gone, so every validation row may have been trained on: only the two held-out
    # scores recorded on the very same rows are comparable (the weights are never loaded).
    assert champion_score("unused.safetensors", str(path), db, name, version, val_ids, [True] * 5, 0.9) == (
        0.8,
        0.9,
        "the same 5 validation rows, both held out at training",
    )
    assert champion_score("unused.safetensors", str(path), db, name, version, val_ids[:4], [True] * 4, 0.9) == (
        None,
        None,
        "it was refit on table version 999",
    )


def test_champion_moves_only_on_a_better_validation_score(table, mlflow_store, prefect_harness):
    db, name, version = table
    # One epoch at a tiny learning rate cannot separate four intents: a weak first champion.
    weak = train_head.fn(db, name, version, {"epochs": 1, "lr": 1e-6, "val_split": 0.2, "early_stop_patience": 0}, {"hidden_dim": 64})
    first = register_and_promote.fn(weak["run_id"], db, name, version, weak["val_ids"], weak["val_response_acc"])
    assert (first["version"], first["promoted"], first["reason"]) == (1, True, "no champion yet")

    good = train_head.fn(db, name, version, {"epochs": 30, "lr": 5e-3, "val_split": 0.2}, {"hidden_dim": 64, "dropout": 0.0})
    assert good["val_ids"] == weak["val_ids"]  # the same validation rows on every run
    assert good["val_response_acc"] > weak["val_response_acc"]
    second = register_and_promote.fn(good["run_id"], db, name, version, good["val_ids"], good["val_response_acc"])
    assert second["promoted"] is True and registry.champion_version() == 2

    # Worse, then merely equal: registered, but the alias stays where it is.
    for run, expected in ((weak, 3), (good, 4)):
        again = train_head.fn(
            db,
            name,
            version,
            {
                "epochs": 30 if run is good else 1,
                "lr": 5e-3 if run is good else 1e-6,
                "val_split": 0.2,
                "early_stop_patience": 0 if run is weak else 6,
            },
            {"hidden_dim": 64, "dropout": 0.0 if run is good else 0.5},
        )
        result = register_and_promote.fn(again["run_id"], db, name, version, again["val_ids"], again["val_response_acc"])
        assert result["version"] == expected and result["promoted"] is False
        assert "champion kept" in result["reason"]
    assert registry.champion_version() == 2
    listed = registry.list_versions()
    assert [v["version"] for v in listed] == [4, 3, 2, 1] and listed[2]["aliases"] == ["champion"]
    assert listed[2]["val_response_acc"] == pytest.approx(good["val_response_acc"])
    assert registry.rollback() == (2, 1) and registry.champion_version() == 1
    with pytest.raises(ValueError, match="--version 9 is not registered"):
        registry.rollback(9)


def test_run_logs_params_epoch_metrics_and_checkpoint(table, mlflow_store, prefect_harness, tmp_path):
    db, name, version = table
    out = train_head.fn(
        db,
        name,
        version,
        {"epochs": 5, "lr": 5e-3, "early_stop_patience": 0},
        {"hidden_dim": 32},
        str(tmp_path / "w.pth"),
        str(tmp_path / "m.json"),
    )
    client = registry.client()
    run = client.get_run(out["run_id"])
    assert run.data.params["lr"] == "0.005" and run.data.params["head.hidden_dim"] == "32"
    assert run.data.params["resolved.batch_size"] == "64"  # auto: small data gets small batches
    # 4 validation rows: the whole schedule, its last epoch, then a refit on every row.
    assert (
        run.data.params["resolved.select_metric"],
        run.data.params["resolved.early_stop_patience"],
        run.data.params["resolved.refit"],
    ) == ("last", "0", "True")
    assert run.data.tags["model_size"] == "base" and run.data.tags["table_version"] == str(version)
    assert [m.step for m in client.get_metric_history(out["run_id"], "train_loss")] == [1, 2, 3, 4, 5]
    files = {f.path for f in client.list_artifacts(out["run_id"], "model")}
    assert files == {
        "model/head.safetensors",
        "model/meta.json",
        "model/MLmodel",
        "model/input_example.json",
        "model/serving_input_example.json",
    }  # MLmodel: a pyfunc model
    evaluation = {f.path for f in client.list_artifacts(out["run_id"], "evaluation")}
    assert evaluation == {"evaluation/confusion_matrix.png", "evaluation/per_bucket_accuracy.json"}
    # Per-step metrics (batched), one point per optimizer step.
    steps = client.get_metric_history(out["run_id"], "step_loss")
    assert len(steps) == out["metrics"]["epochs_run"] * 1 and steps[0].step == 1
    assert run.data.tags["data_version"] and run.data.tags["size"] == "base"
    # The runs table shows the size and the data by name, and the table version as a dataset input.
    assert run.info.run_name == f"base · tiny · {name} v{version}"
    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest, used.dataset.source_type) == ("tiny", run.data.tags["data_version"], "lancedb")
    assert json.loads(used.dataset.source)["version"] == version and json.loads(used.dataset.profile) == {"num_rows": 26}
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "training")]
    assert (tmp_path / "w.pth").is_file() and (tmp_path / "m.json").is_file()
    # Artifacts live beside the SQLite store, not in the current directory.
    assert mlflow.get_experiment_by_name("bucketchat").artifact_location.startswith((tmp_path / "mlruns").as_uri())
    acc = response_accuracy(str(tmp_path / "w.pth"), str(tmp_path / "m.json"), db, name, version, out["val_ids"])
    assert acc == out["val_response_acc"]


def test_missing_model_names_the_store_and_the_fix(mlflow_store):
    with pytest.raises(ValueError, match="Train one first"):
        registry.download_model("models:/bucketchat@champion")


def test_warm_start_from_a_registry_uri_reports_what_matched(table, mlflow_store, prefect_harness, tmp_path):
    db, name, version = table
    base = train_head.fn(db, name, version, {"epochs": 20, "lr": 5e-3, "val_split": 0.2}, {"hidden_dim": 32, "dropout": 0.0})
    register_and_promote.fn(base["run_id"], db, name, version, base["val_ids"], base["val_response_acc"])
    # One epoch at lr ~0 keeps the warm-started weights: a larger head starts where the smaller one was.
    big = train_head.fn(
        db,
        name,
        version,
        {"epochs": 1, "lr": 1e-12, "val_split": 0.2, "early_stop_patience": 0},
        {"model_size": "large", "expansion_dim": 16},
        weights="models:/bucketchat@champion",
    )
    ws = big["warm_start"]
    assert ws["source"] == "models:/bucketchat@champion" and ws["skipped"] == []
    assert "trunk.0.weight" in ws["matched"] and any(n.startswith("branches.0.") for n in ws["new"])
    assert big["val_response_acc"] == base["val_response_acc"]  # hidden_dim 32 inherited from the checkpoint
    files = {f.path for f in registry.client().list_artifacts(big["run_id"], "evaluation")}
    assert "evaluation/warm_start.json" in files


def test_train_all_pins_a_table_version_embedded_by_the_fine_tuned_encoder(table, mlflow_store, prefect_harness, tmp_path):
    from retrieval.answer import ChatEngine
    from retrieval.store import open_table, table_encoder

    db, name, version = table
    out = train_head.fn(
        db,
        name,
        version,
        {"epochs": 1, "lr": 5e-3, "val_split": 0.2, "train_all": True, "batch_size": 16, "encoder_lr": 1e-4},
        {"hidden_dim": 32},
        str(tmp_path / "w.pth"),
        str(tmp_path / "m.json"),
    )
    pinned = out["table_version"]
    assert pinned > version
    tbl = open_table(db, name, pinned)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["encoder"].startswith("sentence-transformers/all-MiniLM-L6-v2+ft:") and table_encoder(tbl) == meta["encoder"]
    assert table_encoder(open_table(db, name, version)) == INT8_ID  # the old version is untouched
    assert (tmp_path / "w.encoder" / "model.safetensors").is_file() and meta["encoder_dir"] == "w.encoder"
    files = {f.path for f in registry.client().list_artifacts(out["run_id"], "model")}
    assert "model/head.encoder" in files
    engine = ChatEngine(str(tmp_path / "w.pth"), str(tmp_path / "m.json"))
    assert engine.encoder_path == str((tmp_path / "w.encoder").resolve())
    assert engine.answer("how do I reset my password").response
    # A model must not be paired with vectors of another encoder.
    meta["table"]["version"] = version
    (tmp_path / "m2.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vectors come from encoder"):
        ChatEngine(str(tmp_path / "w.pth"), str(tmp_path / "m2.json"))


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", ["train:epoch3", "refit:epoch3"])
def test_kill_9_mid_training_then_resume_reaches_the_uninterrupted_result(table, tmp_path, prefect_api_env, killed_at):
    """A real `bucketchat finetune` killed with SIGKILL after epoch 3 of 8 of the held-out run or of
    the refit, then `--resume`d: same weights as a run that was never interrupted, in the same MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    db, name, version = table
    env = {
        **os.environ,
        **prefect_api_env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}",
        "BUCKETCHAT_HOME": str(tmp_path / "home"),
    }
    exe = str(Path(sys.executable).parent / "bucketchat")

    def cmd(out: str, *extra: str) -> list[str]:
        return [
            exe,
            "finetune",
            "--db",
            db,
            "--table",
            name,
            "--epochs",
            "8",
            "--early_stop_patience",
            "0",
            "--hidden_dim",
            "64",
            "--output",
            str(tmp_path / f"{out}.pth"),
            "--meta",
            str(tmp_path / f"{out}.json"),
            *extra,
        ]

    # SIGKILL from inside, right after epoch 3 (BUCKETCHAT_FAILPOINT): deterministic, unlike a timer.
    proc = subprocess.Popen(
        cmd("killed"), env={**env, "BUCKETCHAT_FAILPOINT": killed_at}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert proc.wait(timeout=300) == -signal.SIGKILL
    state = tmp_path / "killed.pth.state"
    assert state.is_file() and not (tmp_path / "killed.pth").exists()
    assert (tmp_path / "killed.pth.state.refit").is_file() == killed_at.startswith("refit")
    run_id = state.with_suffix(".run").read_text()
    subprocess.run(cmd("killed", "--resume"), env=env, check=True, capture_output=True)
    subprocess.run(cmd("whole"), env=env, check=True, capture_output=True)
    resumed, whole = load_file(str(tmp_path / "killed.pth")), load_file(str(tmp_path / "whole.pth"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert json.loads((tmp_path / "killed.json").read_text())["mlflow_run_id"] == run_id
    assert not state.exists() and not (tmp_path / "killed.pth.state.refit").exists()  # finished: nothing left to resume


def test_cli_flags_and_a_deployments_few_parameters_make_the_same_run_settings():
    """The CLI passes every flag, a deployment only what it changes: the same settings either way,
    hence the same training key and the same MLflow params."""
    from dataclasses import asdict

    from interfaces.flags import run_config
    from interfaces.parser import build_parser
    from models.config import run_settings

    a = build_parser().parse_args(["pipeline", "--data", "x.jsonl", "--epochs", "3", "--hidden_dim", "32"])
    cli = run_settings(*run_config(a))
    deployment = run_settings({"epochs": 3}, {"hidden_dim": 32})
    assert cli == deployment
    assert (
        cli[0].epochs == 3
        and cli[0].lr is None
        and asdict(cli[1])
        == {
            "model_size": "base",
            "hidden_dim": 32,
            "dropout": None,
            "expansion_dim": None,
            "extra_expansion_dim": None,
            "third_expansion_dim": None,
            "lexical_features": None,
            "num_buckets": 10,
        }
    )
    with pytest.raises(ValueError, match="--epochs"):
        run_settings({"epochs": 0}, {})
    with pytest.raises(ValueError, match="--extra_expansion_dim needs --model_size xlarge or xxlarge"):
        run_settings({}, {"model_size": "large", "extra_expansion_dim": 64})
