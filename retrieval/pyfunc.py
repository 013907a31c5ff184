"""The bot as a standard MLflow model (``pyfunc``): every registered version's folder carries an
``MLmodel`` file naming this module as its loader (tasks/registry.py, ``describe_pyfunc``), so

    mlflow.pyfunc.load_model("models:/bucketchat@champion").predict(pd.DataFrame({"message": [...]}))
    mlflow models serve -m models:/bucketchat@champion --env-manager local

answer with the chat engine: one row per message, the stored response (or the fallback) and the
figures behind it. The model answers from the table version it pins, which must be on this machine's
disk (or object store) as at training. No MLflow import here: MLflow calls ``_load_pyfunc``.
"""

from __future__ import annotations

from pathlib import Path

# What predict returns, column by column (the signature MLflow records: tasks/registry.py).
OUTPUTS = {
    "response": "string",
    "chosen": "string",
    "fallback": "boolean",
    "confidence": "double",
    "margin": "double",
    "similarity": "double",
    "bucket": "long",
}
INPUT = "message"


class BucketchatModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict`` answers a DataFrame of messages."""

    def __init__(self, folder: str | Path):
        from retrieval.answer import ChatEngine

        folder = Path(folder)
        self.engine = ChatEngine(str(folder / "head.safetensors"), str(folder / "meta.json"))

    def predict(self, model_input, params: dict | None = None):
        """``model_input``: a DataFrame with a ``message`` column (or one column of text), a list or
        a Series of messages. A message that cannot be answered (empty, too long) gets the fallback
        with ``chosen`` None, so a batch never fails on one bad row."""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if INPUT in model_input.columns:
                messages = model_input[INPUT]
            elif len(model_input.columns) == 1:
                messages = model_input.iloc[:, 0]
            else:
                raise ValueError(f"the input needs a {INPUT!r} column; it has {', '.join(map(str, model_input.columns))}")
        else:
            messages = pd.Series(list(model_input))
        rows = []
        for m in messages.tolist():
            try:
                a = self.engine.answer(m if isinstance(m, str) else "" if m is None else str(m))
            except ValueError:
                rows.append(
                    {
                        "response": self.engine.opts.fallback_response,
                        "chosen": None,
                        "fallback": True,
                        "confidence": 0.0,
                        "margin": 0.0,
                        "similarity": None,
                        "bucket": -1,
                    }
                )
                continue
            rows.append({k: getattr(a, k) for k in OUTPUTS})
        out = pd.DataFrame(rows, columns=list(OUTPUTS))
        return out.astype({"bucket": "int64", "fallback": "bool", "confidence": "float64", "margin": "float64", "similarity": "float64"})


def _load_pyfunc(path: str) -> BucketchatModel:
    """MLflow's entry point (the ``loader_module`` contract): ``path`` is the model's folder."""
    return BucketchatModel(path)
