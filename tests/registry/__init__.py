"""Tests of pipeline/registry/."""
