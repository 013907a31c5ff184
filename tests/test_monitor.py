"""Monitoring from the conversation log (retrieval/monitor.py, `bucketchat report`): exact per-day
figures from a real log, printed by the command and logged to a real MLflow run."""

import json
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc

from interfaces.cli import main
from retrieval.answer import Answer
from retrieval.monitor import daily
from retrieval.turn_log import TurnLog, read_turns, turns_folder


def _log_day(folder) -> None:
    log = TurnLog(folder, model="models:/bucketchat@champion", table="conversations", table_version=3, source="serve")
    ids = [
        log.record(f"q{i}", Answer(response="r", bucket=0, confidence=c, fallback=c < 0.3, latency_ms=4.0 + i), conversation=f"c{i // 2}")
        for i, c in enumerate([0.9, 0.2, 0.8, 0.1])
    ]
    log.feedback(ids[0], "good")
    log.feedback(ids[1], "bad")
    log.close()


def test_each_day_counts_turns_fallbacks_ratings_and_confidence(tmp_path):
    _log_day(tmp_path)
    today = read_turns(tmp_path)
    tomorrow = today.set_column(0, "time", pc.add(today["time"], pa.scalar(timedelta(days=1))))
    days = daily(pa.concat_tables([today, tomorrow.slice(0, 1)]))
    assert [d["turns"] for d in days] == [4, 1] and days[0]["conversations"] == 2
    first = days[0]
    assert first["fallback_rate"] == 0.5 and first["rated"] == 2 and first["thumbs_down_rate"] == 0.5
    assert first["confidence_p50"] == 0.5 and first["latency_p50_ms"] == 5.5
    assert first["served_by"] == ["models:/bucketchat@champion (table v3)"]
    assert days[1]["rated"] == 1 and days[1]["thumbs_down_rate"] == 0.0  # the turn rated good


def test_report_prints_the_days_and_logs_them_to_the_models_run(tmp_path, capsys, mlflow_store):
    import mlflow
    from tasks.registry import configure

    db = tmp_path / "db"
    _log_day(turns_folder(db))
    assert main(["report", "--db", str(db), "--json"]) == 0
    days = json.loads(capsys.readouterr().out)
    assert len(days) == 1 and days[0]["turns"] == 4 and days[0]["thumbs_down_rate"] == 0.5
    assert main(["report", "--db", str(tmp_path / "empty")]) == 0
    assert "no turns logged yet" in capsys.readouterr().out

    configure()
    with mlflow.start_run() as run:
        pass
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"mlflow_run_id": run.info.run_id, "table": {"db": str(db), "name": "conversations", "version": 3}}))
    assert main(["report", "--weights", str(tmp_path / "w.safetensors"), "--meta", str(meta), "--mlflow"]) == 0
    client = mlflow.tracking.MlflowClient()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "daily_turns")] == [4.0]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "monitoring")} == {"monitoring/daily.png", "monitoring/daily.json"}
