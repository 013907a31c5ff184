"""The commands that answer: ``chat`` (the REPL, or one answer per piped line), ``eval`` and ``serve``,
each on a registered model (the bot's champion by default) or a local checkpoint."""

from __future__ import annotations

import io
import json
import signal
import sys
from pathlib import Path

from interfaces.repl import answer_lines, run_repl
from interfaces.signals import COMMAND, at_stop, stop_now
from tasks.settings import CHAMPION_ALIAS


def load_engine(a):
    from retrieval.answer import ChatEngine, ChatOptions
    from tasks import registry

    if bool(a.weights) != bool(a.meta):
        raise ValueError("--weights and --meta go together; pass both, or neither to use --model")
    a.model = a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}"
    weights, meta = (a.weights, a.meta) if a.weights else registry.download_model(a.model)
    opts = ChatOptions(
        device=a.device,
        model_size=a.model_size,
        pool_mode=a.pool_mode,
        top_labels=a.top_labels,
        response_temperature=a.response_temperature,
        llm_db=a.llm_db,
        db_top_k=a.db_top_k,
        min_confidence=a.min_confidence,
        min_margin=a.min_margin,
        min_similarity=a.min_similarity,
        style_mode=a.style_mode,
        creativity=a.creativity,
        seed=a.seed,
    )
    return ChatEngine(str(weights), str(meta), opts)


def start_log(engine, a, source: str):
    """The conversation log of this process (retrieval/turn_log.py), unless --no_log or the model
    answers without a table; closed at exit, which seals it (a kill loses at most the last second)."""
    import atexit

    from retrieval.turn_log import TurnLog, turns_folder

    pinned = engine.meta.get("table") or {}
    db = engine.opts.llm_db or pinned.get("db")
    if getattr(a, "no_log", False) or not db:
        return None
    import re

    model = a.weights or a.model
    cached = re.match(r"v(\d+)-", Path(engine.files[0]).parent.name)  # the registry's local copy: .../NAME/vN-RUN/
    if not a.weights and cached:
        model = f"{a.model} = v{cached.group(1)}"  # which version the alias named when this process loaded it
    log = TurnLog(
        turns_folder(db),
        model=model,
        table=engine.index_about.get("table") or pinned.get("name"),
        table_version=engine.index_about.get("version") or pinned.get("version"),
        source=source,
    )
    engine.turn_log = log
    atexit.register(log.close)
    at_stop(log.close)
    return log


def cmd_chat(a) -> None:

    engine = load_engine(a)
    start_log(engine, a, "chat")
    if sys.stdin.isatty():
        pinned = engine.meta.get("table", {})
        run_repl(engine, f"model from {a.weights or a.model}, table {pinned.get('name')} v{pinned.get('version')}", a.json)
        return
    # Bytes, so that a line of invalid UTF-8 is one line's error rather than the end of the batch.
    stdin = getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8", "surrogatepass"))
    failed = answer_lines(engine, stdin, sys.stdout.buffer, a.json, a.echo)
    if failed and a.strict:
        raise SystemExit(1)


def cmd_eval(a) -> None:
    from conversations.records import check_input, require_pairs
    from interfaces.flags import columns
    from models import progress

    # The test files first: a typo is one line at once, not after the model and table load.
    cols = columns(a)
    require_pairs(a.data, "--data", cols)
    if a.oos:
        check_input(a.oos, "--oos")
    from retrieval.evaluate import evaluate, format_report

    engine = load_engine(a)
    progress.show_on(sys.stderr)  # a bar per pass on a terminal; the report goes to stdout
    try:
        report = evaluate(engine, a.data, a.oos, cols)
    finally:
        progress.show_on(None)
    print(json.dumps(report, indent=2) if a.json else format_report(report))
    run_id = engine.meta.get("mlflow_run_id")
    if report.get("oos", {}).get("tradeoff") and run_id:
        from tasks import registry

        try:
            registry.log_oos_tradeoff(run_id, report)
            print(f"bucketchat eval: the trade-off curve is logged to MLflow run {run_id} (eval/oos_tradeoff.png)", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the report is printed; the plot is a courtesy
            print(f"bucketchat eval: could not log the trade-off to MLflow run {run_id} ({exc})", file=sys.stderr)


def cmd_serve(a) -> None:
    import os

    from interfaces.server import ServerConfig
    from interfaces.serving import auto_workers, serve, stop_helpers

    a.model = a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}"
    if a.workers != "auto" and not (a.workers.isdigit() and int(a.workers) >= 1):
        raise ValueError(f"--workers must be auto or a number of processes (1 or more), got {a.workers!r}")
    cfg = ServerConfig(
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("BUCKETCHAT_API_KEY") or None,
        max_concurrency=a.max_concurrency,
        threads=a.workers_threads,
        model_name=a.weights or a.model,
        workers=auto_workers() if a.workers == "auto" else int(a.workers),
        drop_dir=str(Path(a.drop_dir).resolve()),
    )
    engine = load_engine(a)
    start_log(engine, a, "serve")

    # The server writes only its conversation log (sealed by stop_now), so a signal may end it at once: raising inside uvicorn's start-up
    # would leave a half-made event loop to complain at exit. uvicorn puts its own graceful handler
    # in place while it runs, and raises the signal again after shutting down: it lands here.
    def stop(signum, frame):
        stop_helpers()
        stop_now(COMMAND[0], signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    serve(engine, cfg)
