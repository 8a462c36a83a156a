"""Prefect orchestration of the DVC pipeline (no training logic here; see flows.pipeline_flow)."""
