"""Flow: train a head on a pinned table version, register it, promote it if better (``bucketchat finetune``)."""

from prefect import flow

from conversations.records import Columns
from models.config import HeadSettings, TrainConfig
from tasks.database import build_database, embed_version
from tasks.promotion import previous_training, register_and_promote
from tasks.settings import MODEL_NAME, TABLE_NAME
from tasks.training import train_head


@flow(name="finetune")
def finetune_flow(
    db: str,
    data: str | None = None,
    table: str = TABLE_NAME,
    table_version: int | None = None,
    train: TrainConfig | None = None,
    head: HeadSettings | None = None,
    output: str | None = None,
    meta: str | None = None,
    num_buckets: int = 10,
    strict: bool = False,
    weights: str | None = None,
    resume: bool = False,
    force: bool = False,
    model_name: str = MODEL_NAME,
    replace_champion: bool = False,
    columns: Columns | None = None,
    encoder: str | None = None,
) -> dict:
    """With ``data``, (re)build the table first (cached embeddings make that cheap); otherwise train on
    ``table_version`` of an existing table (default: its latest). ``weights`` warm-starts from a local
    checkpoint or a ``models:/`` URI; ``resume`` continues a killed run of the same settings.
    ``encoder`` (a sentence-transformers folder) embeds the table with it first: the built table, or
    a re-embedded copy of ``table_version`` as a new version (the model pins that one).

    A table whose content, settings and training code already produced a registered version is not
    trained again (``force`` trains anyway): an unchanged data drop changes nothing. The model is a
    version of the bot ``model_name``; ``replace_champion`` lets a model whose responses differ from
    the champion's take over (tasks/promotion.py, ``register_and_promote``)."""
    train, head = train or TrainConfig(), head or HeadSettings(num_buckets=num_buckets)
    built = None
    if data:
        built = build_database(data, db, table, head.num_buckets, train.seed, train.device, strict, columns, encoder)
        table_version = built["version"]
    else:
        if table_version is None:
            from retrieval.store import latest_complete_version

            table_version = latest_complete_version(db, table)
        if encoder:
            table_version = embed_version(db, table, table_version, encoder, train.device)
    # Warm starts and resumes depend on more than the key says (the champion moves; a state file).
    found = (
        {"key": None, "previous": None}
        if (weights or resume)
        else previous_training(db, table, table_version, train, head, [p for p in (output, meta) if p], model_name)
    )
    previous = None if force else found["previous"]
    if previous is not None:
        registered = {
            "version": previous["version"],
            "promoted": False,
            "reason": previous["reason"],
            "previous_champion": previous["champion"],
            "champion_val_acc": None,
        }
        return {
            "table": {"db": db, "name": table, "version": table_version},
            "build": built,
            "train": {"run_id": previous["run_id"], "val_response_acc": previous["val_response_acc"], "skipped": True},
            "registry": registered,
        }
    trained = train_head(db, table, table_version, train, head, output, meta, weights, resume)
    # With --train_all the model pins a new version (vectors from its fine-tuned encoder).
    pinned = trained["table_version"]
    promotion = register_and_promote(
        trained["run_id"],
        db,
        table,
        pinned,
        trained["val_ids"],
        trained["val_response_acc"],
        found["key"],
        trained["val_right"],
        model_name,
        replace_champion,
    )
    return {
        "table": {"db": db, "name": table, "version": pinned},
        "build": built,
        "train": {k: v for k, v in trained.items() if k not in ("val_ids", "val_right")},
        "registry": promotion,
    }
