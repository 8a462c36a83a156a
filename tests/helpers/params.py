"""Variants of the shipped params that several test modules build."""

from __future__ import annotations


def chat_params(params, gate: str, guards: list[dict] | None = None):
    """The shipped params with a chat eval set and another gate, validated as params.yaml would be."""
    from pipeline.config import Params

    raw = params.model_dump(by_alias=True)
    raw["data"]["eval"]["format"] = "messages"
    raw["register"]["gate_metric"] = gate
    raw["register"]["guards"] = guards or []
    return Params.model_validate(raw)
