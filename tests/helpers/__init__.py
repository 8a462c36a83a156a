"""Shared test helpers (no tests here): project copies, README commands, tiny chat models, the race driver."""
