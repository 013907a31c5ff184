import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    # A scheduled retrain and a pipeline run can start together on a new SQLite store: each would
    # create MLflow's tables (alembic migrations) and the experiment, and the loser of that race died
    # with "Online migration expected to match one row". Four real processes, released together.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp_path / "home")}
    go = tmp_path / "go"
    code = (
        "import sys, time, mlflow, sqlalchemy; from pathlib import Path\n"  # import first: start together
        f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "from tasks.registry import configure, register\n"
        "exp = configure()\n"
        "run = mlflow.start_run(); mlflow.end_run()\n"
        "print(exp, register(run.info.run_id, {}))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outs)
    experiments = {out.split()[0] for out, _ in outs}
    versions = sorted(int(out.split()[1]) for out, _ in outs)
    assert len(experiments) == 1 and versions == [1, 2, 3, 4]  # one experiment; every run registered


def test_chat_reads_a_registered_model_from_the_local_cache_without_importing_mlflow(tmp_path):
    """The champion's files are copied once into a local cache keyed by store, version and run; the
    alias is still resolved on every load (so a rollback is followed), with no MLflow import."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp_path / "home")}
    make = (
        "import json, tempfile, mlflow; from pathlib import Path\n"
        "from tasks import registry\n"
        "registry.configure()\n"
        "for v in (1, 2):\n"
        "    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:\n"
        "        (Path(tmp) / registry.WEIGHTS_FILE).write_text(f'weights {v}')\n"
        "        (Path(tmp) / registry.META_FILE).write_text(json.dumps({'v': v}))\n"
        "        mlflow.log_artifacts(tmp, registry.MODEL_ARTIFACT)\n"
        "    registry.set_champion(registry.register(run.info.run_id, {}))\n"
    )
    subprocess.run([sys.executable, "-c", make], cwd=ROOT, env=env, check=True, capture_output=True)
    load = (
        "import sys; from pathlib import Path\n"
        "from tasks import registry\n"
        "w, m = registry.download_model('models:/bucketchat@champion')\n"
        "print(Path(w).read_text(), 'mlflow' in sys.modules, Path(w).parent.parent.name)\n"
    )

    def champion() -> str:
        return subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.split()

    assert champion()[:3] == ["weights", "2", "True"]  # the first load downloads through MLflow
    assert champion() == ["weights", "2", "False", "bucketchat"]  # then the cache, without MLflow
    rollback = "from tasks import registry; registry.rollback()"
    subprocess.run([sys.executable, "-c", rollback], cwd=ROOT, env=env, check=True, capture_output=True)
    assert champion()[:3] == ["weights", "1", "True"]  # the alias moved: the other version is fetched
    cached = sorted(p.name for p in (tmp_path / "home" / "models").glob("*/bucketchat/*"))
    assert [c.split("-")[0] for c in cached] == ["v1", "v2"]


def test_an_eval_with_off_topic_messages_logs_its_tradeoff_on_the_models_training_run(tmp_path, mlflow_store, chat_model):
    """`eval --oos` on a model with a training run: the report's two figures become metrics of that
    run and the curve a plot and a table among its artifacts."""
    import json

    import mlflow
    from retrieval.answer import ChatEngine
    from retrieval.evaluate import evaluate
    from tasks.registry import configure, log_oos_tradeoff
    from tests.conftest import INTENTS, write_jsonl

    configure()
    with mlflow.start_run() as run:
        pass
    test = write_jsonl(tmp_path / "t.jsonl", [{"user": "where is my package", "assistant": INTENTS["track_order"][0]}])
    (tmp_path / "oos.txt").write_text("what is the capital of peru\nsing me a song\n")
    report = evaluate(ChatEngine(*chat_model), test, tmp_path / "oos.txt")
    log_oos_tradeoff(run.info.run_id, report)
    client = mlflow.tracking.MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics == {"eval_in_scope_accuracy": report["response_accuracy"], "eval_oos_recall": report["oos"]["recall"]}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "eval")} == {"eval/oos_tradeoff.png", "eval/oos_tradeoff.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/oos_tradeoff.json", str(tmp_path))).read_text())
    assert table["oos"]["tradeoff"] == report["oos"]["tradeoff"] and len(table["oos"]["tradeoff"]) >= 2
