"""Tests of the DVC stages (tests/stages/test_<stage>.py) and of dvc.yaml itself."""
