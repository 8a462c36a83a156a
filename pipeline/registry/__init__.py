"""The MLflow model registry: reading versions, the lock, the promotion gate, lineage, model cards, machines."""
