"""Progress bars for the long loops (reading sources, embedding, training), drawn where the command
says and nowhere else.

Library code never picks a stream: a command that owns a terminal hands it over with ``show_on``;
flows run by a worker, tests and scripts hand over nothing, and every bar is a no-op. Bars are tqdm's
(counts, rate, ETA), left on screen when done so the stages read top to bottom.
"""

from __future__ import annotations

from typing import IO

_STREAM: list[IO[str] | None] = [None]


def show_on(stream: IO[str] | None) -> None:
    """Draw bars on ``stream`` (a terminal) from now on; None draws none."""
    _STREAM[0] = stream


def enabled() -> bool:
    stream = _STREAM[0]
    return stream is not None and getattr(stream, "isatty", lambda: False)()


def bar(total: int | None, desc: str, unit: str, **kwargs):
    """A tqdm bar on the command's terminal, or a disabled one (same methods, draws nothing)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"{desc:<10}",
        unit=unit,
        file=_STREAM[0],
        disable=not enabled(),
        dynamic_ncols=True,
        mininterval=0.2,
        leave=True,
        **kwargs,
    )
