"""`python -m pipeline.export`: the export command (pipeline/commands/export.py) under the name users type."""
