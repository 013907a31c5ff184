"""Conversation data, before any model sees it: the text rule, records and their rejects, the
dataset files, the quality filter and dedupe, and synthetic expansion. Plain Python; no Prefect,
MLflow or torch."""
