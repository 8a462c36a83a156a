from pipeline.cli import run_cli
from pipeline.commands.export import main

run_cli(main)
