"""tasks/retries.py: a task retries only an error that can pass, in real Prefect flow runs."""

import pytest
from prefect import flow, task

from tasks.retries import IO_RETRIES, is_transient


@pytest.mark.parametrize(
    "exc, transient",
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(5, "Input/output error"), True),
        (type("MlflowException", (Exception,), {"error_code": "TEMPORARILY_UNAVAILABLE"})(), True),
        (RuntimeError("(sqlite3.OperationalError) database is locked"), True),
        (ValueError("--data holds no usable conversation"), False),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (IsADirectoryError(), False),
        (TypeError(), False),
        (None, False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_a_deterministic_error_runs_once_and_a_transient_one_is_retried(prefect_harness):
    calls = {"bad": 0, "flaky": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def bad_input() -> None:
        calls["bad"] += 1
        raise ValueError("no usable pairs")

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("the store went away")
        return "ok"

    @flow
    def both() -> str:
        with pytest.raises(ValueError):
            bad_input()
        return flaky()

    assert both() == "ok"
    assert calls == {"bad": 1, "flaky": 3}
