"""The sentence encoder as a trainable module, for ``--train_all``: texts in, unit vectors out, with
gradients. It is a private copy of the shipped MiniLM (or of an earlier fine-tuned one), so the
process-wide inference encoder is never modified by training."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from retrieval.encoder import finetuned_id, load_encoder


class TrainableEncoder(nn.Module):
    def __init__(self, path: str | None = None, device: str = "cpu", max_seq_length: int = 128):
        super().__init__()
        self.st = copy.deepcopy(load_encoder(device, path))
        # Chat messages are short; 128 tokens keeps a CPU epoch in minutes, not hours.
        self.st.max_seq_length = min(self.st.max_seq_length or max_seq_length, max_seq_length)

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.st.preprocess(texts).items()}
        return F.normalize(self.st(features)["sentence_embedding"], dim=-1)

    def save(self, folder: str | Path) -> str:
        """Write a loadable SentenceTransformer folder; returns the fine-tuned encoder's id."""
        folder = Path(folder)
        self.st.save(str(folder), safe_serialization=True)
        return finetuned_id(folder)
