"""Prefect flows (one per stage, plus the pipeline that knows their order) and the bucketchat command."""

import tasks  # noqa: F401  -- sets Prefect/MLflow environment defaults before prefect is imported
