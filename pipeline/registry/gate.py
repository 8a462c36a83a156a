"""The promotion gate: whether a new version becomes champion, by the gate metric, the base and the champion.

The gate metric must beat the base and the current champion by `register.min_improvement` in its
direction; guard metrics may not regress against the champion beyond their tolerance. The champion's
numbers are the ones the evaluate stage re-scored on this run's items when that same version is still
champion, its registered tags otherwise.
"""

from __future__ import annotations

from pipeline.config import Params


def improves(new: float, old: float, margin: float, higher_is_better: bool) -> bool:
    """`new` beats `old` by at least `margin` in the metric's own direction (a tie never improves)."""
    gain = new - old if higher_is_better else old - new
    return gain > 0 and gain >= margin


def promotion_decision(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why (or why not).

    `champion` holds the current champion's metrics (None when there is none). The gate metric must
    beat the base and the champion by `min_improvement` in its direction (accuracy up, loss and
    perplexity down); guard metrics may not regress against the champion by more than their tolerance.
    The first version has no champion to guard against.
    """
    gate = params.registry.gate_metric
    margin = params.registry.min_improvement
    higher = params.gate_higher_is_better()
    direction = "higher" if higher else "lower"
    new = metrics[gate]
    base = metrics[gate.replace("tuned_", "base_", 1)]
    if not improves(new, base, margin, higher):
        return False, f"{gate}={new:.4f} does not beat the base ({base:.4f}) by {margin} ({direction} is better)"
    if champion is None:
        return True, f"{gate}={new:.4f} beats base {base:.4f} ({direction} is better) and there is no champion yet"
    if gate not in champion:
        return False, f"the champion has no {gate} to compare with; not promoted (promote by hand if intended)"
    if not improves(new, champion[gate], margin, higher):
        return False, (f"{gate}={new:.4f} does not beat the champion ({champion[gate]:.4f}) by {margin} "
                       f"({direction} is better)")
    unchecked = []
    for guard in params.registry.guards:
        if guard.metric not in champion or guard.metric not in metrics:
            unchecked.append(guard.metric)
            continue
        old, value = champion[guard.metric], metrics[guard.metric]
        worse = (old - value) if params.guard_higher_is_better(guard) else (value - old)
        if worse > guard.tolerance * abs(old):
            return False, (f"guard {guard.metric} regressed from {old:.4g} to {value:.4g} "
                           f"(tolerance {guard.tolerance:.0%} relative)")
    note = f"; guards not checked (no value): {', '.join(unchecked)}" if unchecked else ""
    return True, f"{gate}={new:.4f} beats base {base:.4f} and the champion {champion[gate]:.4f} ({direction} is better){note}"


def registered_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The eval metrics a version was registered with (its `metric.*` tags)."""
    return {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}


def champion_metrics_for(champion, scored: dict) -> tuple[dict[str, float], str]:
    """The champion's numbers to compare with, and where they come from.

    `scored` is what this run's evaluate stage wrote about the champion it scored (reports/champion.json).
    Those numbers count only when they are of this very version (same number and adapter sha256): they
    were measured on the same held-out items by the same code. Otherwise the metrics registered with
    the champion are used, and the source says why."""
    registered = registered_metrics(champion.tags)
    if not scored.get("scored"):
        return registered, (f"registered tags of version {champion.version} (evaluate did not score a champion: "
                            f"{scored.get('reason', 'no record')})")
    same = (str(scored.get("version")) == str(champion.version)
            and scored.get("adapter_sha256") == champion.tags.get("adapter_sha256"))
    if not same:
        return registered, (f"registered tags of version {champion.version} (evaluate scored version "
                            f"{scored.get('version')}, which is no longer the champion)")
    rescored = {k.replace("champion_", "tuned_", 1): float(v) for k, v in scored["metrics"].items()}
    return rescored, f"version {champion.version} re-scored in this run on the same {scored.get('n_items')} held-out items"


def decide(params: Params, client, name: str, version, metrics: dict, scored: dict) -> tuple[bool, str, str]:
    """Apply the gate to `version` (inside the registry lock); returns (promoted, alias, reason)."""
    import mlflow

    if "promotion" in version.tags:  # decided by an earlier attempt: a retry keeps that decision
        alias = next((a for a in ("champion", "challenger") if a in version.aliases), "none")
        return alias == "champion", alias, version.tags["promotion"]
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version.version):
        reason = "already the champion (an earlier registration of this adapter promoted it)"
        client.set_model_version_tag(name, version.version, "promotion", reason)
        return True, "champion", reason
    champion_metrics, source = champion_metrics_for(champion, scored) if champion else (None, "none (no champion)")
    promoted, reason = promotion_decision(params, metrics, champion_metrics)
    alias = "champion" if promoted else "challenger"
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "promotion", f"{reason}; champion numbers: {source}")
    if promoted and champion is not None:
        client.set_model_version_tag(name, version.version, "previous_champion", str(champion.version))
    return promoted, alias, f"{reason}; champion numbers: {source}"
