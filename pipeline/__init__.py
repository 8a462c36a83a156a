"""The pipeline library: one module per DVC stage plus shared config / data / model helpers."""

import os as _os

# Before transformers / huggingface_hub / great-expectations are imported by any stage:
# no telemetry, and no hub look-ups unless the base model is really a hub id (see pipeline.env).
from pipeline.env import configure_environment as _configure_environment

_configure_environment(_os.environ)
