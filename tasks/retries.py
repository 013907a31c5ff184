"""When a failed task may run again: only when a second try can succeed.

Bad input, a missing or unreadable file and a bug fail the same way every time, so retrying them
only doubles the wait and the log; a dropped connection or a busy store may pass a second later.
"""

from __future__ import annotations

# Deterministic even though they are OSErrors: the same path gives the same answer on a retry.
_DETERMINISTIC_OS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_TRANSIENT_MLFLOW = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def is_transient(exc: BaseException | None) -> bool:
    """True for I/O that can succeed a second time (connections, timeouts, a busy file system)."""
    if exc is None or isinstance(exc, _DETERMINISTIC_OS):
        return False
    if getattr(exc, "error_code", None) in _TRANSIENT_MLFLOW or "database is locked" in str(exc):
        return True  # an MlflowException from a busy tracking server or a locked SQLite store
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def retry_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry a task only on a transient error."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)


# For tasks that do I/O against a table folder, an object store or the tracking store.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": retry_transient}
