"""Tests of pipeline/modeling/."""
