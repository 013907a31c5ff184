"""Prefect tasks and the plain data-stage logic they wrap (records, expansion, dedupe, registry)."""

from tasks.settings import apply_environment

# Before any module here imports prefect: Prefect reads its settings once, at import.
apply_environment()


def run_logger():
    """Prefect's run logger inside a flow or task run; a plain logger when a task body runs directly
    (``task.fn(...)`` in tests and scripts), where Prefect has no run to attach to."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("bucketchat")
