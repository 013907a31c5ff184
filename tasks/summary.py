"""The pipeline run's summary as a Prefect markdown artifact (the Prefect UI's Artifacts tab, and the
flow run's page): what the data gave, what was trained, whether it became the champion and why, and
where its MLflow run is."""

from __future__ import annotations

from prefect import task

from tasks.settings import CHAMPION_ALIAS, mlflow_tracking_uri

ARTIFACT_KEY = "bucketchat-pipeline"


def summary_markdown(result: dict, model_name: str, experiment_id: str | None) -> str:
    """The markdown for a pipeline result (flows/pipeline.py's return value)."""
    data, build, train, reg = result["dataset"], result["build"], result["train"], result["registry"]
    dropped = data.get("dropped") or {}
    lines = [
        f"# bucketchat pipeline: {model_name}",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| pairs kept | {data['records']:,} |",
        f"| malformed lines | {data.get('rejected_lines', 0):,} |",
        f"| duplicates dropped | {data.get('duplicates', 0):,} |",
        f"| low quality dropped | {data.get('low_quality', 0):,} |",
        f"| rejects file | `{data.get('rejects')}` |",
    ]
    lines += [f"| dropped: {reason} | {n:,} |" for reason, n in sorted(dropped.items()) if n]
    table = f"`{build['db']}` table `{build['table']}` v{build['version']}, {build['rows']:,} rows"
    table += ", unchanged (no version written)" if build.get("reused") else f", {build['embedded']:,} newly embedded"
    lines += ["", "## Table", "", table, "", "## Model", ""]
    acc = train.get("val_response_acc")
    run_id = train.get("run_id")
    if train.get("skipped"):
        lines.append(f"Not trained: {reg['reason']}. {model_name} v{reg['version']} stays as it was.")
    else:
        lines.append(f"Validation response accuracy: **{acc:.4f}**" if acc is not None else "No validation rows (the model is not scored).")
        verdict = f"**{CHAMPION_ALIAS}**" if reg["promoted"] else "not promoted"
        lines += ["", f"Registered `{model_name}` v{reg['version']}: {verdict}. {reg['reason']}."]
    if run_id:
        lines += [
            "",
            "## MLflow",
            "",
            f"- run `{run_id}` in the store `{mlflow_tracking_uri()}`",
            f"- the model: `models:/{model_name}/{reg['version']}` (`mlflow.pyfunc.load_model` loads it)",
        ]
        if experiment_id is not None:
            ui = _ui_base()
            lines.append(f"- [the run in the MLflow UI]({ui}/#/experiments/{experiment_id}/runs/{run_id}) (start it with `mlflow ui`)")
    return "\n".join(lines) + "\n"


def _ui_base() -> str:
    """Where the MLflow UI is: the tracking server itself, or `mlflow ui`'s default for a local store."""
    uri = mlflow_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


@task
def publish_summary(result: dict, model_name: str) -> str:
    """Attach the run's summary to the flow run as the ``bucketchat-pipeline`` markdown artifact;
    returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    from tasks import registry

    experiment_id = registry.configure() if result["train"].get("run_id") else None
    markdown = summary_markdown(result, model_name, experiment_id)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description=f"bucketchat pipeline: {model_name}")
    return markdown
