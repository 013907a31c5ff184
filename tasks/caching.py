"""Prefect caching keyed on what a stage really depends on: the task's code, its parameters, and the
*contents* of the files its parameters name.

Prefect's ``INPUTS`` policy hashes the parameters as given, so an input file edited in place (same
path) would wrongly hit the cache; ``InputFiles`` adds a digest of each named file's bytes. Results
are stored as JSON in the project's Prefect home (``PREFECT_LOCAL_STORAGE_PATH``, set in
``tasks.settings``), never pickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _named_files(value: Any) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v) for v in values if isinstance(v, str) and Path(v).is_file()]


@dataclass
class InputFiles(CachePolicy):
    """Key on the bytes of the files that *input* parameters name (a path or a list of paths).

    Output parameters must stay out: an output that exists only after the first run would change
    the key and make every second run miss.
    """

    parameters: tuple[str, ...] = ("input", "inputs", "path", "data")

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        h = hashlib.sha256()
        for name in sorted(n for n in (inputs or {}) if n in self.parameters):
            for path in _named_files(inputs[name]):
                h.update(f"{name}:{path}:{file_digest(path)}".encode())
        return h.hexdigest()


# Stages that read files and write files: skip them when code, parameters and input bytes are unchanged.
CONTENT_CACHE = TASK_SOURCE + INPUTS + InputFiles()
CACHED = {"cache_policy": CONTENT_CACHE, "persist_result": True, "result_serializer": "json"}


def outputs_missing(*paths: str | Path) -> bool:
    """True when a stage's outputs are gone, so a cached result would point at nothing: refresh then."""
    return not all(Path(p).exists() for p in paths)
