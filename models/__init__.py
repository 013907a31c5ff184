"""torch: the bucket heads, losses, training loop and checkpoints. No Prefect or MLflow in here."""
