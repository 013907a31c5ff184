"""Real Prefect flow runs (session harness): each stage flow, and the pipeline end to end + chat."""

import json

import pytest

from flows.build_db import build_db_flow
from flows.build_super import build_super_flow
from flows.expand import expand_flow
from flows.pipeline import pipeline_flow
from tasks import registry
from tests.conftest import write_jsonl


def test_expand_flow_writes_both_formats_and_rejects(tmp_path, tiny_records, prefect_harness):
    src = write_jsonl(tmp_path / "in.jsonl", tiny_records + ["{broken"])
    out = expand_flow(str(src), str(tmp_path / "big.jsonl"), 60, seed=1)
    assert out["records"] == 60 and out["rejected_lines"] == 1
    assert sum(1 for _ in open(out["jsonl"])) == 60
    assert [json.loads(l)["line"] for l in open(out["rejects"])] == [25]


def test_build_super_merges_sources_and_drops_duplicates(tmp_path, tiny_records, prefect_harness):
    a = write_jsonl(tmp_path / "a.jsonl", tiny_records[:10])
    b = write_jsonl(tmp_path / "b.jsonl", tiny_records[5:] + [{"user": "same", "assistant": "SAME"}])
    out = build_super_flow([str(a), str(b)], str(tmp_path / "super.jsonl"), target=40)
    assert (out["duplicates"], out["low_quality"], out["records"]) == (5, 1, 40)
    rows = [json.loads(l) for l in open(out["jsonl"])]
    assert {r["source"] for r in rows[:24]} == {"a", "b"}


def test_build_super_takes_an_empty_source_and_an_earlier_stage_dataset(tmp_path, tiny_records, prefect_harness):
    from conversations.dataset import write_dataset
    from conversations.records import load_records

    empty = write_jsonl(tmp_path / "empty.jsonl", ["{broken", '{"user": "no answer"}'])
    earlier = write_dataset(load_records(write_jsonl(tmp_path / "raw.jsonl", tiny_records[:10]))[0], tmp_path / "earlier.jsonl")["parquet"]
    out = build_super_flow([str(empty), earlier], str(tmp_path / "super.jsonl"))
    assert (out["records"], out["rejected_lines"]) == (10, 2)
    report = json.load(open(out["report"]))
    assert report["sources"] == {str(empty): {"pairs": 0, "malformed": 2}, earlier: {"pairs": 10, "malformed": 0}}
    assert [json.loads(l)["line"] for l in open(out["rejects"])] == [1, 2]


def test_build_db_flow_reports_version_and_counts(tmp_path, tiny_jsonl, prefect_harness):
    out = build_db_flow(str(tiny_jsonl), str(tmp_path / "x.db"))
    assert out["rows"] == 26 and out["version"] >= 1 and out["embedded"] == 26


@pytest.mark.slow
def _artifact(flow_run_id) -> str:
    """The pipeline summary a flow run left in Prefect (tasks/summary.py)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["bucketchat-pipeline"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
            return [a.data for a in found]

    (markdown,) = asyncio.run(read())
    return markdown


def test_pipeline_end_to_end_then_chat_from_the_champion(tmp_path, tiny_jsonl, prefect_harness, monkeypatch, capsys):
    """Two runs with their own workdirs and MLflow stores never touch each other."""
    import io
    import sys

    from interfaces.cli import main

    for name in ("one", "two"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        out_state = pipeline_flow(
            [str(tiny_jsonl)],
            workdir=str(tmp_path / name / "work"),
            train={"epochs": 30, "lr": 5e-3},
            head={"hidden_dim": 64, "dropout": 0.0},
            return_state=True,
        )
        out = out_state.result()
        assert out["registry"] == {
            "version": 1,
            "promoted": True,
            "reason": "no champion yet",
            "previous_champion": None,
            "champion_val_acc": None,
            "shared_responses": None,
        }
        assert out["dataset"]["records"] == 26 and "input_records" not in out["dataset"]  # no expansion unless --target
        assert registry.champion_version() == 1
        work = tmp_path / name / "work"
        assert {p.name for p in work.iterdir()} >= {
            "dataset.jsonl",
            "dataset.parquet",
            "dataset.rejects.jsonl",
            "llm_chat.db",
            "champion_model_chat_ft.pth",
            "chat_model_meta.json",
        }

    # The champion is a standard MLflow model, with its signature and input example.
    import pandas as pd

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    bot = mlflow.pyfunc.load_model("models:/bucketchat@champion")
    assert bot.metadata.get_input_schema().input_names() == ["message"]
    assert len(bot.input_example) == 3 and list(bot.input_example.columns) == ["message"]
    got = bot.predict(pd.DataFrame({"message": ["I forgot my password", ""]}))
    assert list(got.columns) == ["response", "chosen", "fallback", "confidence", "margin", "similarity", "bucket"]
    assert got["response"][0].startswith("Use Settings") and not got["fallback"][0]
    assert got["fallback"][1] and pd.isna(got["chosen"][1])  # an empty message falls back; the batch does not fail

    # Each pipeline run leaves its summary in Prefect, with the promotion decision and the MLflow run.
    markdown = _artifact(out_state.state_details.flow_run_id)
    assert "| pairs kept | 26 |" in markdown and "Registered `bucketchat` v1: **champion**. no champion yet." in markdown
    assert f"run `{out['train']['run_id']}`" in markdown and "/#/experiments/" in markdown

    monkeypatch.setattr(sys, "stdin", io.StringIO("I forgot my password\nhow do I undo a commit in git\n"))
    assert main(["chat", "--json"]) == 0  # the champion of store "two"
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["response"][:12] for l in lines] == ["Use Settings", "Run `git res"]
    meta = json.loads((tmp_path / "two" / "work" / "chat_model_meta.json").read_text())
    assert meta["table"]["db"] == str(tmp_path / "two" / "work" / "llm_chat.db")


def test_unchanged_inputs_hit_the_cache_and_edited_inputs_do_not(tmp_path, tiny_records, prefect_harness):
    """A cached stage does not run: its output is not rewritten. New bytes at the same path, or a
    deleted output, make it run again."""
    src = write_jsonl(tmp_path / "in.jsonl", tiny_records)
    out = tmp_path / "super.parquet"

    def run() -> int:
        result = build_super_flow([str(src)], str(tmp_path / "super.jsonl"))
        assert result["records"] == sum(1 for _ in open(result["jsonl"]))
        return out.stat().st_mtime_ns

    first = run()
    assert run() == first  # cached
    write_jsonl(src, tiny_records[:-1])  # same path, new bytes
    edited = run()
    assert edited != first
    out.unlink()
    (tmp_path / "super.jsonl").unlink()
    assert out.exists() is False and run() > edited  # output gone: runs again


def test_sources_are_read_by_mapped_tasks_on_a_dask_cluster(tmp_path, tiny_records, prefect_harness):
    from prefect_dask import DaskTaskRunner

    from flows.prepare import prepare_flow

    a = write_jsonl(tmp_path / "a.jsonl", tiny_records[:12])
    b = write_jsonl(tmp_path / "b.jsonl", tiny_records[12:] + ["{bad"])
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": False, "threads_per_worker": 1})
    out = prepare_flow.with_options(task_runner=runner)([str(a), str(b)], str(tmp_path / "m.jsonl"))
    assert out["records"] == 24 and out["rejected_lines"] == 1
    report = json.load(open(out["report"]))
    assert report["sources"] == {str(a): {"pairs": 12, "malformed": 0}, str(b): {"pairs": 12, "malformed": 1}}


def test_size_sweep_trains_every_size_on_one_table_version(tmp_path, tiny_jsonl, prefect_harness, mlflow_store, capsys):
    from interfaces.cli import main

    db = str(tmp_path / "db")
    assert main(["size-sweep", "--data", str(tiny_jsonl), "--db", db, "--epochs", "3", "--hidden_dim", "32", "--expansion_dim", "16"]) == 0
    out = capsys.readouterr().out
    for size in ("base", "large", "xlarge", "xxlarge"):
        assert f"  {size} " in out
    runs = {v["model_size"]: v for v in registry.list_versions()}
    assert set(runs) == {"base", "large", "xlarge", "xxlarge"}
    assert len({v["table_version"] for v in runs.values()}) == 1  # the same table version for every size
    client = registry.client()
    params = {s: client.get_run(v["run_id"]).data.params for s, v in runs.items()}
    assert params["large"]["head.expansion_dim"] == "16" and params["base"]["head.expansion_dim"] == "None"  # every run logs every setting
    assert main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "xxlarge" in listing


def test_prepare_runs_again_after_its_workdir_is_deleted(tmp_path, tiny_jsonl, prefect_harness):
    """The reading stage is cached on its inputs; a cached result whose shard is gone is redone."""
    import shutil

    from flows.prepare import prepare_flow

    out = tmp_path / "work" / "dataset.jsonl"
    first = prepare_flow([str(tiny_jsonl)], str(out))
    shutil.rmtree(tmp_path / "work")
    again = prepare_flow([str(tiny_jsonl)], str(out))
    assert again["records"] == first["records"] == 26 and out.is_file()


def test_flow_parameters_are_typed_and_validated_by_prefect():
    """A deployment's --params become the same TrainConfig / HeadSettings the CLI builds; a bad value
    fails before the run starts, naming the field and the fix."""
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline_flow
    from flows.size_sweep import size_sweep_flow
    from models.config import HeadSettings, TrainConfig

    params = pipeline_flow.validate_parameters({"data": ["x.jsonl"], "train": {"epochs": 3}, "head": {"model_size": "large"}})
    assert params["train"] == TrainConfig(epochs=3) and params["head"] == HeadSettings(model_size="large")
    with pytest.raises(ParameterTypeError, match="--epochs=0 is invalid: use 1 or more"):
        pipeline_flow.validate_parameters({"data": ["x.jsonl"], "train": {"epochs": 0}})
    with pytest.raises(ParameterTypeError, match="train.epoch"):
        pipeline_flow.validate_parameters({"data": ["x.jsonl"], "train": {"epoch": 3}})
    with pytest.raises(ParameterTypeError, match="--model_size 'huge' is not available"):
        size_sweep_flow.validate_parameters({"db": "x.db", "head": {"model_size": "huge"}})
    # A table's columns, as the README's deployment line passes them.
    from conversations.records import Columns

    params = pipeline_flow.validate_parameters({"data": ["t.csv"], "columns": {"user": "question", "assistant": "answer"}})
    assert params["columns"] == Columns(user="question", assistant="answer")
