"""Whole-pipeline tests: dvc repro end to end, Prefect flows, team servers, DVC remotes."""
