"""The run config (``config.py``, plain dataclasses) and, in torch, the bucket heads, losses, training
loop, calibration and checkpoints. The lowest layer: it imports nothing else of bucketchat's, and no
Prefect or MLflow."""
