"""Where a table's files live: LanceDB's own (a folder or an object-store URI) and the side files
bucketchat keeps beside them. Kept apart from the store so that finding a file needs no LanceDB."""

from __future__ import annotations

import hashlib
from pathlib import Path

from retrieval.encoder import INT8_SUFFIX, STOCK_IDS, cache_home

ENCODERS_DIR = "_encoders"  # encoders a table's versions were embedded with (fine-tuned or the user's), by id hash


def is_uri(db: str | Path) -> bool:
    """An object-store location (``s3://``, ``gs://``, ``az://``, ``file://``…) rather than a folder."""
    return "://" in str(db)


def db_key(db: str | Path) -> str:
    """How a model names the table it pins: an absolute folder, or the URI as given."""
    return str(db) if is_uri(db) else str(Path(db).resolve())


BUILD_DIR = "_build"


def local_dir(db: str | Path) -> Path:
    """The local folder for a table's side files (embedding cache, fine-tuned encoders, resume
    states): the db folder itself, or for an object-store URI a folder per URI in the machine's
    bucketchat cache, so nothing but LanceDB's own files goes to the bucket."""
    if not is_uri(db):
        return Path(db)
    return cache_home() / "object-store" / hashlib.sha256(str(db).encode()).hexdigest()[:16]


def build_dir(db: str | Path) -> Path:
    """Where jobs on a table keep their working files: ``db build``'s folders (one per process) and
    finetune's scratch maps (unlinked as made), beside the table's local side files."""
    return local_dir(db) / BUILD_DIR


def encoder_folder(db: str | Path, encoder_id: str) -> Path | None:
    """Where the encoder a table version was embedded with is kept beside it: a fine-tuned one
    (``--train_all``) or the user's (``--encoder``); None for the shipped encoder."""
    if encoder_id in STOCK_IDS:
        return None
    return local_dir(db) / ENCODERS_DIR / encoder_id.rsplit(":", 1)[-1].removesuffix(INT8_SUFFIX)


def table_encoder_path(db: str | Path, encoder_id: str) -> str | None:
    """The folder of ``encoder_folder`` as a string, checked to hold its weights; None for the shipped encoder."""
    folder = encoder_folder(db, encoder_id)
    if folder is None:
        return None
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the table in {db!r} was embedded by encoder {encoder_id}, whose copy {str(folder)!r} beside the table is missing; rebuild the table with `bucketchat db build` (with the same --encoder)"
        )
    return str(folder)
