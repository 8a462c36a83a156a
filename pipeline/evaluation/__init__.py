"""Evaluation: scoring items with a model, task metrics, interval estimates."""
