"""Serve the `finetune-pipeline` flow as deployment `finetune-pipeline/scheduled` on a cron schedule.

    prefect server start --host 127.0.0.1          # UI and API on http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy   # from the project root

The schedule is PIPELINE_CRON (default "0 3 * * *", nightly at 03:00 UTC). This process is the
runner: keep it running; scheduled and manual runs execute here. In the UI open Deployments ->
finetune-pipeline/scheduled to see the schedule and start a run ("Run" -> "Quick run"), then Runs
for each flow run with one task per DVC stage. Stopping this process pauses the schedule.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEPLOYMENT_NAME = "scheduled"
DEFAULT_CRON = "0 3 * * *"


def cron_schedule() -> str:
    return os.environ.get("PIPELINE_CRON") or DEFAULT_CRON


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from flows.pipeline_flow import finetune_pipeline  # prefect: after parsing, so `--help` is quick

    finetune_pipeline.serve(
        name=DEPLOYMENT_NAME,
        cron=cron_schedule(),
        parameters={"project_dir": str(Path.cwd().resolve())},
    )


if __name__ == "__main__":
    main()
