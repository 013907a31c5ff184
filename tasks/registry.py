"""MLflow: the tracking store, the ``bucketchat`` registered model and its ``champion`` alias.

The champion alias is the only thing chat trusts by default, so it moves in one call
(``set_registered_model_alias``), after the new version's files are fully logged and registered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tasks.settings import CHAMPION_ALIAS, EXPERIMENT_NAME, MODEL_NAME, artifact_location, mlflow_tracking_uri, sqlite_path

MODEL_ARTIFACT = "model"  # run artifact folder: head.safetensors + meta.json, and MLmodel (an MLflow pyfunc)
WEIGHTS_FILE, META_FILE = "head.safetensors", "meta.json"


@contextmanager
def _store_lock(db_file: Path | None):
    """Hold an exclusive lock beside a SQLite store while it is set up. Processes that open a new
    store at once (a scheduled retrain beside a pipeline run) would each run MLflow's table
    migrations and create the experiment, and all but one died ("Online migration expected to match
    one row"; tests/test_registry.py). A server-backed store migrates on the server: no lock."""
    if db_file is None:
        yield
        return
    import fcntl

    with open(db_file.with_name(db_file.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def configure() -> str:
    """Point MLflow at the store (``MLFLOW_TRACKING_URI`` or the project's SQLite) and the experiment.

    Returns the experiment id. Artifacts of a SQLite store go beside the database file.
    """
    import mlflow

    uri = mlflow_tracking_uri()
    db_file = sqlite_path(uri)
    if db_file:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    with _store_lock(db_file):
        exp = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def client():
    from mlflow import MlflowClient

    configure()
    return MlflowClient()


def register(run_id: str, tags: dict[str, str], name: str = MODEL_NAME) -> int:
    """Register the run's model folder as a version of the bot ``name``; returns its number.

    Idempotent: a run already registered (a retry after a failure past this point) gets its version
    back instead of a second one."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        done = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        done = []
    if done:
        return min(int(mv.version) for mv in done)
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description="a bucketchat bot: response-bucket heads; alias 'champion' is what chat serves")
        except MlflowException as exc:  # another process created it since: use theirs
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    run = c.get_run(run_id)
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags)
    return int(mv.version)


def describe_pyfunc(folder: Path, examples: list[str]) -> None:
    """Make a model folder (head + meta) a standard MLflow ``pyfunc`` model in place: an ``MLmodel``
    file naming retrieval/pyfunc.py as its loader, the signature (a ``message`` column in; the
    response, fallback and scores out) and an input example of ``examples`` (training messages).
    The folder is not copied, so a model that brings its own encoder is not stored twice."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, Schema

    from retrieval.pyfunc import INPUT, OUTPUTS

    model = Model()
    model.signature = ModelSignature(
        inputs=Schema([ColSpec("string", INPUT)]),
        # No stored response for a message that could not be answered, no similarity without a table.
        outputs=Schema([ColSpec(kind, name, required=name not in ("chosen", "similarity")) for name, kind in OUTPUTS.items()]),
    )
    # pandas 3 reads text as its own string dtype; the example is plain objects, as a user's frame would be.
    _save_example(model, pd.DataFrame({INPUT: pd.Series(examples[:3], dtype=object)}), str(folder))
    mlflow.pyfunc.add_to_model(model, loader_module="retrieval.pyfunc")
    model.save(str(folder / "MLmodel"))


def log_oos_tradeoff(run_id: str, report: dict) -> None:
    """An ``eval --oos`` report on the training run of the model it evaluated: its in-scope accuracy
    and out-of-scope recall as metrics, and the trade-off curve over ``--min_similarity`` as a plot
    (``eval/oos_tradeoff.png``) and a table (``eval/oos_tradeoff.json``), beside the run's own plots."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configure()
    curve, now = report["oos"]["tradeoff"], report["thresholds"]["min_similarity"]
    mlflow_client = client()
    for key, value in (("eval_in_scope_accuracy", report["response_accuracy"]), ("eval_oos_recall", report["oos"]["recall"])):
        mlflow_client.log_metric(run_id, key, float(value))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([p["oos_recall"] for p in curve], [p["in_scope_accuracy"] for p in curve], marker="o")
    for p in curve:
        ax.annotate(
            f"{p['min_similarity']:.2f}", (p["oos_recall"], p["in_scope_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.plot(
        [report["oos"]["recall"]],
        [report["response_accuracy"]],
        marker="*",
        markersize=14,
        color="tab:red",
        label=f"now (min_similarity {now:.3f})",
    )
    ax.set(
        xlabel=f"out-of-scope recall ({report['oos']['messages']} messages)",
        ylabel=f"in-scope accuracy ({report['messages']} messages)",
        title="fallback trade-off over --min_similarity",
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "oos_tradeoff.png", dpi=110)
        (Path(tmp) / "oos_tradeoff.json").write_text(json.dumps({"data": report["data"], "oos": report["oos"]}, indent=2))
        mlflow_client.log_artifacts(run_id, tmp, artifact_path="eval")
    plt.close(fig)


def log_monitoring(run_id: str, days: list[dict]) -> None:
    """``bucketchat report --mlflow``: each day's figures as metrics of the model's training run (at
    that day's time, step = day number since the first), and a plot ``monitoring/daily.png``."""
    import json
    from datetime import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    configure()
    first = datetime.fromisoformat(days[0]["day"]).toordinal()
    metrics = []
    for d in days:
        stamp = int(datetime.fromisoformat(d["day"]).timestamp() * 1000)
        step = datetime.fromisoformat(d["day"]).toordinal() - first
        for key in ("turns", "fallback_rate", "thumbs_down_rate", "confidence_p50"):
            if d[key] is not None:
                metrics.append(Metric(f"daily_{key}", float(d[key]), stamp, step))
    mlflow_client = client()
    mlflow_client.log_batch(run_id, metrics=metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [d["day"] for d in days]
    ax.bar(x, [d["turns"] for d in days], color="#cbd5e1", label="turns")
    ax.set_ylabel("turns")
    rates = ax.twinx()
    rates.plot(x, [d["fallback_rate"] for d in days], marker="o", label="fallback rate")
    rates.plot(
        x, [d["thumbs_down_rate"] if d["thumbs_down_rate"] is not None else float("nan") for d in days], marker="s", label="thumbs down"
    )
    rates.set_ylim(0, 1)
    rates.set_ylabel("share of turns / of ratings")
    rates.legend(loc="upper left")
    ax.set_title("conversation log, per day")
    fig.autofmt_xdate()
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "daily.png", dpi=110)
        (Path(tmp) / "daily.json").write_text(json.dumps(days, indent=2))
        mlflow_client.log_artifacts(run_id, tmp, artifact_path="monitoring")
    plt.close(fig)


def champion_version(name: str = MODEL_NAME) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client().get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def set_champion(version: int, name: str = MODEL_NAME) -> None:
    client().set_registered_model_alias(name, CHAMPION_ALIAS, str(version))


def _registered_version(db_file: Path, name: str, ref: str) -> tuple[int, str] | None:
    """(version, run id) of ``models:/NAME@ALIAS`` or ``models:/NAME/N`` read straight from a SQLite
    store, or None when it cannot tell (no such file, alias or version; another schema).

    Chat needs only this from MLflow once the model's files are in the local cache, and importing
    MLflow and opening its store cost more than the rest of chat's start together (BENCHMARKS.md,
    "Start-up"). Read-only; MLflow's own calls stay the path for everything else and for a server."""
    import sqlite3

    if not db_file.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db_file.as_uri()}?mode=ro", uri=True, timeout=5)) as conn:
            if ref.isdigit():
                version = int(ref)
            else:
                row = conn.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, ref)).fetchone()
                if row is None:
                    return None
                version = int(row[0])
            row = conn.execute("SELECT run_id FROM model_versions WHERE name = ? AND version = ?", (name, version)).fetchone()
    except sqlite3.Error:
        return None
    return (version, row[0]) if row and row[0] else None


def _model_cache(uri: str) -> tuple[Path, Path] | None:
    """Where a registered model's files are kept locally, by store, name, version and run (so a new
    store that reuses the version numbers never finds another model's files), or None for a URI
    that is not a registered model of a SQLite store."""
    import hashlib

    from tasks.settings import state_home

    db_file = sqlite_path(mlflow_tracking_uri())
    if db_file is None or not uri.startswith("models:/"):
        return None
    name, _, ref = uri[len("models:/") :].partition("@")
    if not ref:
        name, _, ref = name.rpartition("/")
    if not name or not ref:
        return None
    found = _registered_version(db_file, name, ref)
    if found is None:
        return None
    version, run_id = found
    store = hashlib.sha256(str(db_file).encode()).hexdigest()[:12]
    folder = state_home() / "models" / store / name / f"v{version}-{run_id}"
    return folder / WEIGHTS_FILE, folder / META_FILE


def download_model(uri: str, dst: str | Path | None = None) -> tuple[Path, Path]:
    """Local (weights, meta) paths for a ``models:/…`` or ``runs:/…`` URI, or a local folder.

    A registered model of a SQLite store is copied once into a local cache and read from there
    after (the alias is still resolved every time, so a moved champion is followed at once)."""
    local = Path(uri)
    cached = None if dst or local.is_dir() else _model_cache(uri)
    if cached and cached[0].is_file() and cached[1].is_file():
        return cached
    if not uri.startswith(("models:/", "runs:/")) and local.is_dir():
        folder = local
    else:
        from mlflow.exceptions import MlflowException

        import mlflow

        configure()
        if dst:
            Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
        except MlflowException as exc:
            raise ValueError(
                f"--model {uri!r} could not be loaded from the MLflow store {mlflow_tracking_uri()!r} ({exc.message}). "
                "Train one first (`bucketchat pipeline --data FILE`), set MLFLOW_TRACKING_URI to the store that has it, or pass --weights/--meta"
            ) from exc
    weights, meta = folder / WEIGHTS_FILE, folder / META_FILE
    if not weights.is_file() or not meta.is_file():
        raise ValueError(f"--model {uri!r} has no {WEIGHTS_FILE} and {META_FILE}; it was not written by `bucketchat finetune`")
    if cached:
        # The folder whole or not at all (renamed into place): a kill mid-copy leaves no half entry.
        target = cached[0].parent
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            # The whole folder: a model with its own encoder (--train_all, --encoder) has it beside the head.
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            os.rename(tmp, target)
        except OSError:
            pass  # another process put it there first, or the cache cannot be written: use the download
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if cached[0].is_file() and cached[1].is_file():
            return cached
    return weights, meta


def tag_version(version: int, tags: dict[str, str], name: str = MODEL_NAME) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, v)


def list_versions(name: str = MODEL_NAME) -> list[dict]:
    """Every registered version, newest first, with its run's scores, size, aliases and tags."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        aliases: dict[str, list[str]] = {}
        for alias, version in c.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    except MlflowException:
        return []
    out = []
    for mv in c.search_model_versions(f"name='{name}'"):
        run = c.get_run(mv.run_id) if mv.run_id else None
        metrics = run.data.metrics if run else {}
        out.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "val_response_acc": metrics.get("best_val_response_acc"),
                "val_bucket_acc": metrics.get("best_val_bucket_acc"),
                "model_size": run.data.tags.get("model_size") if run else None,
                "table_version": mv.tags.get("table_version"),
                "data_version": run.data.tags.get("data_version") if run else None,
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "promotion": mv.tags.get("promotion"),
            }
        )
    return sorted(out, key=lambda v: -v["version"])


def find_versions(tags: dict[str, str], name: str = MODEL_NAME) -> list[dict]:
    """Registered versions carrying every one of ``tags``, newest first."""
    from mlflow.exceptions import MlflowException

    c = client()
    query = " and ".join([f"name='{name}'", *(f"tags.{k}='{v}'" for k, v in tags.items())])
    try:
        found = c.search_model_versions(query)
    except MlflowException:
        return []
    return sorted(
        (
            {
                "version": int(mv.version),
                "run_id": mv.run_id,
                "val_response_acc": float(mv.tags["val_response_acc"]) if mv.tags.get("val_response_acc", "n/a") != "n/a" else None,
            }
            for mv in found
        ),
        key=lambda v: -v["version"],
    )


def rollback(version: int | None = None, name: str = MODEL_NAME) -> tuple[int | None, int]:
    """Point ``champion`` at ``version`` (default: the newest version older than the current
    champion). Returns (previous champion, new champion)."""
    versions = [v["version"] for v in list_versions(name)]
    if not versions:
        raise ValueError(
            f"no versions of {name!r} are registered in {mlflow_tracking_uri()!r}; train one first (`bucketchat pipeline --data FILE --model_name {name}`)"
        )
    current = champion_version(name)
    if version is None:
        older = [v for v in versions if current is not None and v < current]
        if not older:
            raise ValueError(
                f"champion v{current} has no older version to roll back to; pass --version N (registered: {', '.join(map(str, sorted(versions)))})"
            )
        version = max(older)
    if version not in versions:
        raise ValueError(f"--version {version} is not registered; registered versions: {', '.join(map(str, sorted(versions)))}")
    set_champion(version, name)
    tag_version(version, {"promotion": f"rolled back to by `bucketchat registry rollback` (was v{current})"}, name)
    return current, version
