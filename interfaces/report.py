"""``bucketchat report``: the conversation log, per day (retrieval/monitor.py), for the champion's
table (or a given model's, or ``--db``); ``--mlflow`` logs it to that model's training run."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.settings import CHAMPION_ALIAS


def cmd_report(a) -> None:
    from retrieval.monitor import daily, format_daily
    from retrieval.turn_log import read_turns, turns_folder

    meta = {}
    if a.db is None or a.mlflow:
        if bool(a.weights) != bool(a.meta):
            raise ValueError("--weights and --meta go together; pass both, or neither to use --model")
        if a.meta:
            meta = json.loads(Path(a.meta).read_text())
        else:
            from tasks import registry

            _, meta_path = registry.download_model(a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}")
            meta = json.loads(Path(meta_path).read_text())
    db = a.db or (meta.get("table") or {}).get("db")
    if not db:
        raise ValueError("the model names no table, so there is no conversation log to read; pass --db DB")
    folder = turns_folder(db)
    turns = read_turns(folder)
    if a.days:
        import pyarrow as pa
        import pyarrow.compute as pc

        since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=a.days - 1)
        turns = turns.filter(pc.greater_equal(turns["time"], pa.scalar(since, pa.timestamp("us", tz="UTC"))))
    days = daily(turns)
    print(json.dumps(days, indent=2) if a.json else format_daily(days))
    if a.mlflow:
        run_id = meta.get("mlflow_run_id")
        if not run_id:
            raise ValueError("--mlflow: the model has no MLflow training run to log to; use a registered model (--model)")
        if days:
            from tasks import registry

            registry.log_monitoring(run_id, days)
            print(f"bucketchat report: {len(days)} day(s) logged to MLflow run {run_id} (monitoring/daily.png)", file=sys.stderr)
