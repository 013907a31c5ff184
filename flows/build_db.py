"""Flow: build the LanceDB conversation table (``bucketchat db build``).

By default one process embeds and writes. With ``dask_workers`` (a local cluster of that many
worker processes) or ``dask_address`` (a running cluster's scheduler), the new messages are first
embedded as mapped tasks on the cluster (flows/embed.py); the table is then written from the cache.
"""

from prefect import flow

from conversations.records import Columns
from flows.embed import embed_flow
from tasks.database import PARTITION_ROWS, build_database, plan_embedding
from tasks.settings import TABLE_NAME


@flow(name="build-db")
def build_db_flow(
    data: str,
    db: str,
    table: str = TABLE_NAME,
    num_buckets: int = 10,
    seed: int = 0,
    device: str = "cpu",
    strict: bool = False,
    columns: Columns | None = None,
    encoder: str | None = None,
    dask_workers: int = 0,
    dask_address: str | None = None,
    partition_rows: int = PARTITION_ROWS,
) -> dict:
    on_cluster = 0
    if dask_workers or dask_address:
        from prefect_dask import DaskTaskRunner

        plan = plan_embedding(data, db, strict, columns, encoder, partition_rows)
        if plan["partitions"]:
            runner = (
                DaskTaskRunner(address=dask_address)
                if dask_address
                else DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "processes": True, "threads_per_worker": 1})
            )
            on_cluster = embed_flow.with_options(task_runner=runner)(
                plan["partitions"], plan["cache"], plan["encoder_id"], plan["encoder_path"], device
            )
    built = build_database(data, db, table, num_buckets, seed, device, strict, columns, encoder)
    return {**built, "embedded": built["embedded"] + on_cluster, "embedded_on_cluster": on_cluster}


if __name__ == "__main__":
    import sys

    print(build_db_flow(sys.argv[1], sys.argv[2]))
