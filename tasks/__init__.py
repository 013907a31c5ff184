"""Prefect tasks and MLflow tracking around the core: each task takes and returns plain data (paths,
table names, versions, run ids). Importing this package changes nothing; the interfaces apply the
environment (``tasks.settings.apply_environment``) before Prefect is first imported."""


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
