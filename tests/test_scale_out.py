"""The scale-out path, exercised here: the table on an object-store URI (``file://``: the same
object_store code path LanceDB uses for s3/gs/az), and MLflow as a tracking server with a database
backend and proxied artifacts. (Dask-mapped tasks: tests/test_flows.py.)"""

import json
import os
import sys
from pathlib import Path

import pytest

from interfaces.cli import main
from tasks import registry
from tests.conftest import free_port, http_process


def test_pipeline_and_chat_with_the_table_at_an_object_store_uri(tmp_path, tiny_jsonl, prefect_harness, mlflow_store, capsys, monkeypatch):
    import io

    uri = f"file://{tmp_path / 'bucket' / 'llm_chat.db'}"
    assert (
        main(
            [
                "pipeline",
                "--data",
                str(tiny_jsonl),
                "--workdir",
                str(tmp_path / "work"),
                "--db",
                uri,
                "--target",
                "0",
                "--epochs",
                "20",
                "--hidden_dim",
                "32",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "work" / "chat_model_meta.json").read_text())
    assert meta["table"]["db"] == uri
    # Only LanceDB's own files went to the "bucket"; the embedding cache stayed local.
    assert [p.name for p in (tmp_path / "bucket" / "llm_chat.db").iterdir()] == ["conversations.lance"]
    assert not (tmp_path / "file:").exists()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("how long do I boil an egg\n"))
    assert main(["chat", "--json", "--llm_db", uri]) == 0
    assert json.loads(capsys.readouterr().out)["response"].startswith("Boil eggs 6 minutes")
    assert main(["db", "stats", "--db", uri]) == 0
    assert "26 rows" in capsys.readouterr().out


@pytest.mark.slow
def test_training_against_an_mlflow_server_with_a_database_backend(tmp_path, tiny_jsonl, prefect_harness, monkeypatch, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with http_process(cmd, f"{url}/health", tmp_path / "mlflow-server.log", env={**os.environ, "MLFLOW_TRACKING_URI": ""}):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        db = str(tmp_path / "db")
        assert (
            main(
                [
                    "finetune",
                    "--data",
                    str(tiny_jsonl),
                    "--db",
                    db,
                    "--epochs",
                    "10",
                    "--hidden_dim",
                    "32",
                    "--output",
                    str(tmp_path / "m.pth"),
                    "--meta",
                    str(tmp_path / "m.json"),
                ]
            )
            == 0
        )
        assert registry.champion_version() == 1
        # The checkpoint went through the server's artifact proxy into its store, and comes back.
        assert list((tmp_path / "artifacts").rglob("head.safetensors"))
        capsys.readouterr()
        assert main(["registry", "list"]) == 0
        assert "champion" in capsys.readouterr().out
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO("I forgot my password\n"))
        assert main(["chat", "--json"]) == 0  # models:/bucketchat@champion from the server
        assert json.loads(capsys.readouterr().out)["response"].startswith("Use Settings")


def test_db_build_embeds_on_a_dask_cluster_of_two_processes_like_one_process(tmp_path, tiny_records, prefect_harness, monkeypatch):
    """The table is the same as the single-process build's (rows, buckets, vectors), every message
    was embedded on the cluster in several partitions, and a build of the same data embeds nothing."""
    import numpy as np

    from flows.build_db import build_db_flow
    from retrieval.store import open_table
    from tests.conftest import write_jsonl

    # More distinct messages than one partition holds, so both workers get work.
    records = [{**r, "user": f"{r['user']} (case {i})"} for i in range(6) for r in tiny_records]
    data = str(write_jsonl(tmp_path / "d.jsonl", records))
    one = build_db_flow(data, str(tmp_path / "one.db"))
    two = build_db_flow(data, str(tmp_path / "two.db"), dask_workers=2, partition_rows=25)
    assert two["embedded_on_cluster"] == len(records) and two["embedded"] == len(records) == one["embedded"]
    assert two["buckets"] == one["buckets"]
    a, b = (open_table(str(tmp_path / f"{n}.db"), "conversations").to_arrow().sort_by("id") for n in ("one", "two"))
    assert a.select(["id", "user", "assistant", "bucket"]).to_pylist() == b.select(["id", "user", "assistant", "bucket"]).to_pylist()
    va, vb = (np.stack(t["vector"].to_numpy(zero_copy_only=False)) for t in (a, b))
    assert np.abs(va - vb).max() < 1e-2  # int8 tolerance; in fact the same encoder gives the same vectors
    cache = tmp_path / "two.db" / "_embedding_cache"
    assert len(list(cache.glob("*.parquet"))) >= 2 and not list(cache.glob("staging-*/*"))  # a shard per partition; none left over
    again = build_db_flow(data, str(tmp_path / "two.db"), dask_workers=2, partition_rows=25)
    assert again["embedded"] == 0 and again["reused"]

    # A worker killed (SIGKILL) on its first partition: Dask runs that partition again elsewhere.
    monkeypatch.setenv("BUCKETCHAT_FAILPOINT", "embed:partition")
    monkeypatch.setenv("BUCKETCHAT_FAILPOINT_ONCE", str(tmp_path / "killed-once"))
    killed = build_db_flow(data, str(tmp_path / "killed.db"), dask_workers=2, partition_rows=25)
    assert (tmp_path / "killed-once").exists() and killed["embedded_on_cluster"] == len(records)
    assert open_table(str(tmp_path / "killed.db"), "conversations").to_arrow().sort_by("id")["user"].to_pylist() == a["user"].to_pylist()
