"""Move alias `champion` back to the previous champion: `python -m pipeline.commands.rollback [--model-name NAME]`.

The register stage tags each promoted version with `previous_champion`; rolling back follows that
tag and records what happened on both versions, so the registry keeps the history.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.cli import cli_parser, run_cli
from pipeline.config import load_params
from pipeline.errors import DataError
from pipeline.registry.lock import registry_lock
from pipeline.registry.read import champion_version, registry_call
from pipeline.tracking import configure, tracking_uri


def rollback(client, name: str) -> tuple[str, str]:
    """Point `champion` at the previous champion; return (from_version, to_version)."""
    current = champion_version(client, name)  # an unreachable registry fails after retries, not as "no champion"
    if current is None:
        raise DataError(f"registered model {name!r} has no `champion` alias: nothing to roll back")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise DataError(f"{name}@champion is version {current.version}, the first champion: nothing to roll back to")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    registry_call(client.set_registered_model_alias, name, "champion", previous)
    registry_call(client.set_model_version_tag, name, str(current.version), "rolled_back",
                  f"{when}: champion moved back to version {previous}")
    registry_call(client.set_model_version_tag, name, previous, "restored_from",
                  f"{when}: rollback from version {current.version}")
    return str(current.version), previous


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.rollback")
    parser.add_argument("--model-name", default=None, help="registered model (default: params register.model_name)")
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    params = load_params()
    name = args.model_name or params.registry.model_name
    configure(params)
    with registry_lock(tracking_uri(params), name):  # never between a registration's read and its alias move
        old, new = rollback(MlflowClient(), name)
    print(f"rollback: {name}@champion moved from version {old} back to version {new}")


if __name__ == "__main__":
    run_cli(main)
