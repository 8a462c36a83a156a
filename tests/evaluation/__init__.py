"""Tests of pipeline/evaluation/."""
