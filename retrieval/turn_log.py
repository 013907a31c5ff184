"""The conversation log: every turn chat and serve answer, kept beside the table the model answers
from (``<db>/_turns/``), for the review of what the bot could not answer and for monitoring.

Why this shape (DESIGN.md, "The conversation log"): answering must never wait for the disk, and a
``kill -9`` must lose at most the last second. So ``record`` only appends to a list under a lock; a
writer thread appends the pending turns to this process's segment, one JSON line per turn, every
``FLUSH_S`` seconds, and fsyncs it. A segment is sealed into Parquet (the columns below, typed) when
the process closes the log, or, if the process was killed, by the next process to open a log in
that folder. Readers take the Parquet files and any live segment together (``read_turns``).
Each process writes its own segment (``turns-PID-START.jsonl``), so server workers never share one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

from models.processes import process_start

FLUSH_S = 1.0
MAX_PENDING = 100_000  # turns kept in memory while the log cannot be written
SEGMENT_MAX_BYTES = 32 << 20  # a long-running server seals its segment into Parquet at this size (~50k turns)
TURNS_DIR = "_turns"
RATINGS = ("good", "bad")
COLUMNS = {  # name -> pyarrow type name
    "time": "timestamp",
    "kind": "string",  # "turn", or "feedback" on an earlier turn (its rating)
    "turn": "string",
    "rating": "string",
    "conversation": "string",
    "source": "string",
    "message": "string",
    "response": "string",
    "chosen": "string",
    "bucket": "int64",
    "confidence": "float64",
    "margin": "float64",
    "similarity": "float64",
    "fallback": "bool",
    "latency_ms": "float64",
    "model": "string",
    "table": "string",
    "table_version": "int64",
}


def _schema():
    import pyarrow as pa

    types = {
        "timestamp": pa.timestamp("us", tz="UTC"),
        "string": pa.string(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
    }
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS.items()])


def _seal(segment: Path) -> Path | None:
    """Turn a closed JSONL segment into a Parquet file beside it (atomically), then remove it. A last
    line cut short by a kill is dropped: it was never whole on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.atomic import atomic_path

    rows = []
    for line in segment.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    out = segment.with_suffix(".parquet")
    if rows:
        for r in rows:
            r["time"] = datetime.fromisoformat(r["time"])
        table = pa.Table.from_pylist(rows, schema=_schema())
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    segment.unlink()
    return out if rows else None


class TurnLog:
    """This process's log of turns into ``folder``. ``record`` never blocks on the disk; ``close``
    writes what is pending and seals the segment (call it on a clean shutdown)."""

    def __init__(self, folder: str | Path, model: str, table: str | None, table_version: int | None, source: str):
        self.folder = Path(folder).resolve()  # the writer thread must not follow a later chdir
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fixed = {"model": model, "table": table, "table_version": table_version, "source": source}
        self.spec = {"folder": str(self.folder), **self.fixed}  # what another process needs to log alike
        self.segment = self._new_segment()
        self._pending: list[dict] = []
        self._lock = threading.Lock()  # the pending list: held for an append, never for the disk
        self._writing = threading.Lock()  # one flush at a time (the thread's, or a caller's)
        self._warned = False
        self._stop = threading.Event()
        self._seal_orphans()
        self._thread = threading.Thread(target=self._run, name="bucketchat-turn-log", daemon=True)
        self._thread.start()

    def _new_segment(self) -> Path:
        pid = os.getpid()
        return self.folder / f"turns-{pid}-{process_start(pid) or 0}-{uuid.uuid4().hex[:8]}.jsonl"

    def record(self, message: str, answer, conversation: str) -> str:
        """Log one answered turn; returns its id (what feedback names)."""
        turn_id = uuid.uuid4().hex[:16]
        turn = {
            "time": datetime.now(UTC).isoformat(),
            "kind": "turn",
            "turn": turn_id,
            "rating": None,
            "conversation": conversation,
            "message": message,
            "response": answer.response,
            "chosen": answer.chosen,
            "bucket": answer.bucket,
            "confidence": answer.confidence,
            "margin": answer.margin,
            "similarity": answer.similarity,
            "fallback": answer.fallback,
            "latency_ms": answer.latency_ms,
            **self.fixed,
        }
        with self._lock:
            self._pending.append(turn)
        return turn_id

    def feedback(self, turn: str, rating: str, conversation: str | None = None) -> None:
        """A person's rating of an earlier turn (thumbs up or down), stored with the turns; the last
        rating of a turn wins."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {', '.join(RATINGS)}, got {rating!r}")
        if not isinstance(turn, str) or not 0 < len(turn) <= 64:
            raise ValueError("turn must be the id an answer came with (a string of at most 64 characters)")
        entry = dict.fromkeys(COLUMNS) | {"time": datetime.now(UTC).isoformat(), "kind": "feedback", "turn": turn, "rating": rating}
        with self._lock:
            self._pending.append(entry | {"conversation": conversation, **self.fixed})

    def flush(self) -> int:
        """Write the pending turns to the segment and fsync it; returns how many."""
        with self._writing:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return 0
            try:
                with open(self.segment, "a", encoding="utf-8") as fh:
                    fh.write("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in pending))
                    fh.flush()
                    os.fsync(fh.fileno())
                    full = fh.tell() >= SEGMENT_MAX_BYTES
            except OSError as exc:
                # A full disk or a removed folder must not cost the answers, nor the turns: they wait
                # for the next flush (at most MAX_PENDING), and the problem is said once.
                with self._lock:
                    self._pending = (pending + self._pending)[-MAX_PENDING:]
                if not self._warned:
                    self._warned = True
                    logging.getLogger(__name__).warning(
                        "the conversation log cannot write to %s (%s); turns are kept in memory until it can", self.segment, exc
                    )
                return 0
            if full:
                sealed, self.segment = self.segment, self._new_segment()
                _seal(sealed)
            return len(pending)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()

    def close(self) -> None:
        """Write what is pending and seal the segment; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.flush()
        if self.segment.exists():
            _seal(self.segment)

    def _seal_orphans(self) -> None:
        """Seal the segments of processes that no longer run (killed, so never closed)."""
        for segment in self.folder.glob("turns-*.jsonl"):
            _, pid, start, _ = segment.stem.split("-", 3)
            if pid.isdigit() and process_start(int(pid)) != start:
                try:
                    _seal(segment)
                except FileNotFoundError:  # another process sealed it first
                    pass


def read_turns(folder: str | Path):
    """Every logged turn in ``folder`` as one pyarrow table, oldest first, with its latest rating in
    ``feedback`` (None when nobody rated it): the sealed Parquet files and the segments still being
    written (a killed process's last second may be missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = _read_all(folder)
    is_turn = pc.equal(rows["kind"], "turn")
    ratings = {}
    for r in rows.filter(pc.invert(is_turn)).select(["turn", "rating"]).to_pylist():
        ratings[r["turn"]] = r["rating"]  # oldest first: the last rating wins
    turns = rows.filter(is_turn).drop_columns(["kind", "rating"])
    return turns.append_column("feedback", pa.array([ratings.get(t) for t in turns["turn"].to_pylist()], pa.string()))


def _read_all(folder: str | Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    parts = [pq.read_table(p) for p in sorted(folder.glob("turns-*.parquet"))]
    for segment in sorted(folder.glob("turns-*.jsonl")):
        rows = []
        for line in segment.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            r["time"] = datetime.fromisoformat(r["time"])
            rows.append(r)
        if rows:
            parts.append(pa.Table.from_pylist(rows, schema=_schema()))
    if not parts:
        return _schema().empty_table()
    table = pa.concat_tables(parts)
    return table.take(pa.compute.sort_indices(table, [("time", "ascending")]))


def turns_folder(db: str | Path) -> Path:
    from retrieval.locations import local_dir

    return local_dir(db) / TURNS_DIR
