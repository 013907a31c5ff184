"""Checkpoints: safetensors weights + a JSON meta that explains them (configs, encoder, the table
version the model pins, its candidates and calibration). Loading never unpickles untrusted data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.atomic import atomic_path, write_text
from models.heads import BucketHead, HeadConfig

META_FORMAT = "bucketchat-meta/1"


def save(head: BucketHead, meta: dict[str, Any], weights: str | Path, meta_path: str | Path) -> None:
    """Write weights then meta, each atomically: a reader never sees a half-written file."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "bucketchat", "model_size": head.cfg.model_size})
    write_text(meta_path, json.dumps({"format": META_FORMAT, **meta, "head_config": head.cfg.to_dict()}, indent=2, ensure_ascii=False))


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
        return load_file(str(path))
    try:
        # A legacy .pth: tensors only. weights_only=True refuses any pickled code object.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"--weights {str(path)!r} is neither safetensors nor a tensors-only .pth ({exc.__class__.__name__}: {exc}); retrain or re-export it") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {str(path)!r} does not hold a state dict of tensors")
    return state


def load_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--meta {str(path)!r} does not exist; pass the meta JSON written beside the weights")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--meta {str(path)!r} is not valid JSON ({exc}); pass the meta JSON written by `bucketchat finetune`") from exc
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"--meta {str(path)!r} has format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def load(weights: str | Path, meta_path: str | Path, device: str = "cpu") -> tuple[BucketHead, dict[str, Any]]:
    """Rebuild the head from its meta and load its weights (strict: every tensor must match)."""
    meta = load_meta(meta_path)
    cfg = HeadConfig(**meta["head_config"])
    cands = meta["candidates"]
    head = BucketHead(cfg, torch.tensor(cands["buckets"], dtype=torch.long), torch.tensor([t is not None for t in cands["texts"]]))
    state = load_state(weights)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--weights {str(weights)!r} does not fit --meta {str(meta_path)!r}: {exc}") from exc
    return head.to(device).eval(), meta
