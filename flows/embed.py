"""Flow: embed a build's new messages as mapped tasks, on a Dask cluster when the caller gives this
flow a ``DaskTaskRunner`` (``bucketchat db build --dask_workers N`` or ``--dask_address``).

Each partition's vectors land in the table's embedding cache as a shard of their own, so the build
that follows (flows/build_db.py) finds every row cached and writes one table version. A partition
whose worker died runs again on another worker; finished ones are not redone, and rows cached by
any worker are never embedded again.
"""

from prefect import flow

from tasks.database import embed_partition


@flow(name="embed")
def embed_flow(partitions: list[str], cache: str, encoder_id: str, encoder_path: str | None = None, device: str = "cpu") -> int:
    futures = embed_partition.map(partitions, cache, encoder_id, encoder_path, device)
    return sum(f.result() for f in futures)
