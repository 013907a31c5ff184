"""Flow: scheduled retraining over a folder of data drops (the ``retrain`` deployment).

Every ``*.jsonl`` in ``data_dir`` is one drop; the pipeline rebuilds from all of them (cached
embeddings make unchanged rows free) and the champion moves only if the new model is better.
"""

from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline_flow


@flow(name="retrain")
def retrain_flow(data_dir: str, workdir: str | None = None) -> dict:
    drops = sorted(str(p) for p in Path(data_dir).glob("*.jsonl") if not p.name.endswith(".rejects.jsonl"))
    if not drops:
        raise ValueError(f"data_dir {data_dir!r} holds no *.jsonl data drops; put conversation JSONL files there")
    return pipeline_flow(drops, workdir)


if __name__ == "__main__":
    import sys

    print(retrain_flow(sys.argv[1]))
