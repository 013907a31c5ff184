"""Prefect flows: one per stage, plus the pipeline that knows their order. Flows only wire tasks."""
