"""Flow: build the LanceDB conversation table (``bucketchat db build``)."""

from prefect import flow

from conversations.records import Columns
from tasks.database import build_database
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
) -> dict:
    return build_database(data, db, table, num_buckets, seed, device, strict, columns, encoder)


if __name__ == "__main__":
    import sys

    print(build_db_flow(sys.argv[1], sys.argv[2]))
