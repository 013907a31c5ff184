"""Which process is which: a pid with its start time names one process, even after the pid is reused
(leases of the shared Prefect API, runner tags of flow runs, conversation-log segments)."""

from __future__ import annotations

from pathlib import Path


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
