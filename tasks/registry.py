"""MLflow: the tracking store, the ``bucketchat`` registered model and its ``champion`` alias.

The champion alias is the only thing chat trusts by default, so it moves in one call
(``set_registered_model_alias``), after the new version's files are fully logged and registered.
"""

from __future__ import annotations

from pathlib import Path

from tasks.settings import CHAMPION_ALIAS, EXPERIMENT_NAME, MODEL_NAME, artifact_location, mlflow_tracking_uri, sqlite_path

MODEL_ARTIFACT = "model"  # run artifact folder holding head.safetensors + meta.json
WEIGHTS_FILE, META_FILE = "head.safetensors", "meta.json"


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
    exp = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def client():
    from mlflow import MlflowClient

    configure()
    return MlflowClient()


def register(run_id: str, tags: dict[str, str]) -> int:
    """Register the run's model folder as a new version of ``bucketchat``; returns its number."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_registered_model(MODEL_NAME)
    except MlflowException:
        c.create_registered_model(MODEL_NAME, description="bucketchat response-bucket heads; alias 'champion' is what chat serves")
    run = c.get_run(run_id)
    mv = c.create_model_version(MODEL_NAME, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags)
    return int(mv.version)


def champion_version() -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client().get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def set_champion(version: int) -> None:
    client().set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, str(version))


def download_model(uri: str, dst: str | Path | None = None) -> tuple[Path, Path]:
    """Local (weights, meta) paths for a ``models:/…`` or ``runs:/…`` URI, or a local folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    local = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and local.is_dir():
        folder = local
    else:
        configure()
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
    return weights, meta
