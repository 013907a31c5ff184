"""From a dataset to an answer: the encoder, the LanceDB store (build, stats, hybrid search), bucket
assignment, the in-memory search index and the answer engine. No Prefect or MLflow in here."""
