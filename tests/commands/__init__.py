"""Tests of the user commands (pipeline/commands/)."""
