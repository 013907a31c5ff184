"""Prefect tasks and the plain data-stage logic they wrap (records, expansion, dedupe, registry)."""

from tasks.settings import apply_environment

# Before any module here imports prefect: Prefect reads its settings once, at import.
apply_environment()
