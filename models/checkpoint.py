"""Checkpoints: safetensors weights + a JSON meta that explains them (configs, encoder, the table
version the model pins, its candidates and calibration). Loading never unpickles untrusted data.

The meta is also stored inside the safetensors header, so ``--weights FILE`` alone is enough to warm
start from. A head trained with ``--train_all`` comes with its fine-tuned encoder: a folder beside
the weights (``<weights stem>.encoder``), named in the meta relative to the meta file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.atomic import atomic_dir, atomic_path, write_text
from models.config import HeadConfig
from models.heads import BucketHead

META_FORMAT = "bucketchat-meta/1"


def encoder_dir_for(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".encoder")


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: the meta records it, so weights
    changed after they were written (bit rot, an edit, another model's file) are refused on load."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(head: BucketHead, meta: dict[str, Any], weights: str | Path, meta_path: str | Path, encoder=None) -> dict[str, Any]:
    """Write [encoder folder,] weights, then meta, each atomically: a reader never sees a half-written
    file, and the meta (written last) only ever names files that are complete. Returns the meta."""
    meta = {
        "format": META_FORMAT,
        **{k: v for k, v in meta.items() if k not in ("format", "encoder_path")},
        "head_config": head.cfg.to_dict(),
    }
    if encoder is not None:
        folder = encoder_dir_for(weights)
        with atomic_dir(folder) as tmp:
            meta["encoder"] = encoder.save(tmp)
        meta["encoder_dir"] = os.path.relpath(folder.resolve(), Path(meta_path).resolve().parent)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta["weights_sha256"] = tensor_digest(state)
    text = json.dumps(meta, indent=2, ensure_ascii=False)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "bucketchat", "model_size": head.cfg.model_size, "meta": text})
    write_text(meta_path, text)
    return meta


def save_tree(tree: Any, path: str | Path) -> None:
    """Write nested dicts/lists/tuples of tensors, numbers and strings (an optimizer's state dict, a
    resume state) as one safetensors file, atomically: the tensors as tensors, the structure as JSON
    in the header. Nothing is pickled, so reading it back cannot run code."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach()
            return {"$t": key}
        if isinstance(x, dict):
            return {"$d": [[k, encode(v)] for k, v in x.items()]}  # keys may be ints (optimizer state)
        if isinstance(x, (list, tuple)):
            return {"$l" if isinstance(x, list) else "$u": [encode(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a state file")

    skeleton = json.dumps(encode(tree))
    with atomic_path(path) as tmp:
        _stream_safetensors(tensors, tmp, {"format": "bucketchat-tree/1", "tree": skeleton})


# torch dtype -> safetensors dtype name (the ones a model, an optimizer or an RNG state holds)
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _stream_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The safetensors format written tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save_file`` first copies every tensor into one bytes buffer (and save_tree
    cloned them before that, as save_file refuses tensors sharing storage): two transient copies of a
    whole resume state, every epoch. An xxlarge head's state is 255 MB: over 30 epochs of 10-shot
    BANKING77 the fit's peak RSS reached 3.4 GB (1.0 GB without states; tests/bench/accuracy.py saw
    5.8 GB with the refit's second run). Written straight from each tensor, no copy is made (1.8 GB
    for the same 30 epochs); ``safe_open`` reads it.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, parts = 0, []
    for key, t in tensors.items():
        t = t.cpu().contiguous()  # a copy only for the rare non-contiguous or device tensor
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store a {t.dtype} tensor in a state file")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        parts.append(t)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for t in parts:
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def load_tree(path: str | Path) -> Any:
    """Read what ``save_tree`` wrote; anything else is refused with a ValueError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != "bucketchat-tree/1":
            raise ValueError("not a bucketchat state file")
        skeleton = json.loads(meta["tree"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable bucketchat state file ({exc.__class__.__name__}: {exc})") from exc

    def decode(x: Any) -> Any:
        if isinstance(x, dict):
            if "$t" in x:
                return tensors[x["$t"]]
            if "$d" in x:
                return {k: decode(v) for k, v in x["$d"]}
            if "$l" in x:
                return [decode(v) for v in x["$l"]]
            return tuple(decode(v) for v in x["$u"])
        return x

    return decode(skeleton)


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {str(path)!r} does not exist; pass a checkpoint written by `bucketchat finetune`")
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"--weights {str(path)!r} is a damaged safetensors file ({exc}); restore it or retrain") from exc
    try:
        # A legacy .pth: tensors only. weights_only=True refuses any pickled code object.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ValueError(
            f"--weights {str(path)!r} is neither safetensors nor a tensors-only .pth ({exc.__class__.__name__}: {exc}); retrain or re-export it"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {str(path)!r} does not hold a state dict of tensors")
    return state


def load_meta(path: str | Path) -> dict[str, Any]:
    """The meta JSON, with ``encoder_path`` resolved when the model has a fine-tuned encoder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--meta {str(path)!r} does not exist; pass the meta JSON written beside the weights")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--meta {str(path)!r} is not valid JSON ({exc}); pass the meta JSON written by `bucketchat finetune`") from exc
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"--meta {str(path)!r} has format {meta.get('format')!r}, expected {META_FORMAT!r}")
    if meta.get("encoder_dir"):
        folder = (path.resolve().parent / meta["encoder_dir"]).resolve()
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"--meta {str(path)!r} needs its fine-tuned encoder at {str(folder)!r}, which is missing; copy it along with the weights"
            )
        meta["encoder_path"] = str(folder)
    return meta


def embedded_meta(weights: str | Path) -> dict[str, Any] | None:
    """The meta stored in a bucketchat safetensors header (None for legacy .pth or foreign files)."""
    path = Path(weights)
    if not path.is_file() or not _is_safetensors(path):
        return None
    with safe_open(str(path), framework="pt") as fh:
        text = (fh.metadata() or {}).get("meta")
    return json.loads(text) if text else None


def load(weights: str | Path, meta_path: str | Path, device: str = "cpu") -> tuple[BucketHead, dict[str, Any]]:
    """Rebuild the head from its meta and load its weights (strict: every tensor must match)."""
    meta = load_meta(meta_path)
    cfg = HeadConfig(**meta["head_config"])
    cands = meta["candidates"]
    head = BucketHead(cfg, torch.tensor(cands["buckets"], dtype=torch.long), torch.tensor([t is not None for t in cands["texts"]]))
    state = load_state(weights)
    want = meta.get("weights_sha256")
    if want and tensor_digest(state) != want:
        raise ValueError(
            f"--weights {str(weights)!r} are not the weights --meta {str(meta_path)!r} was written with (tensor digest mismatch: the file was modified or swapped); restore both from the same `bucketchat finetune` run"
        )
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--weights {str(weights)!r} does not fit --meta {str(meta_path)!r}: {exc}") from exc
    return head.to(device).eval(), meta
