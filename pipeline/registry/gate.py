"""The promotion gate: whether a new version becomes champion, by the gate metric, the base and the champion.

The gate metric must beat the base and the current champion by `register.min_improvement` in its
direction; guard metrics may not regress against the champion beyond their tolerance. The champion's
numbers are the ones the evaluate stage re-scored on this run's items when that same version is still
champion, its registered tags otherwise.
"""

from __future__ import annotations

from pipeline.config import Params
from pipeline.metric_catalog import PAIRED_STATS, paired_key
from pipeline.registry.read import champion_version, registry_call


def improves(new: float, old: float, margin: float, higher_is_better: bool) -> bool:
    """`new` beats `old` by at least `margin` in the metric's own direction (a tie never improves)."""
    gain = new - old if higher_is_better else old - new
    return gain > 0 and gain >= margin


def promotion_decision(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why (or why not).

    `champion` holds the current champion's metrics (None when there is none). The gate metric must
    beat the base and the champion by `min_improvement` in its direction (accuracy up, loss and
    perplexity down): as point values (`register.evidence: point`), or with `paired_bootstrap` as the low
    end of the paired 95 % interval of the accuracy difference on the same items. Guard metrics may not
    regress against the champion by more than their tolerance. The first version has no champion to guard
    against.
    """
    gate = paired_gate if params.registry.evidence == "paired_bootstrap" else point_gate
    promoted, reason = gate(params, metrics, champion)
    if not promoted or champion is None:
        return promoted, reason
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
    return True, reason + note


def point_gate(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """The gate metric's values against the base's and the champion's, by `min_improvement`."""
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
    return True, f"{gate}={new:.4f} beats base {base:.4f} and the champion {champion[gate]:.4f} ({direction} is better)"


def paired_evidence(values: dict, second: str) -> str:
    """`tuned − base +0.12 [+0.05, +0.19] (paired bootstrap 95 %), McNemar exact p 0.0011 (20 vs 2 items)`."""
    get = {stat: values[paired_key("tuned", second, stat)] for stat in PAIRED_STATS}
    return (f"tuned − {second} accuracy {get['acc_diff']:+.4f} [{get['acc_diff_ci95_low']:+.4f}, "
            f"{get['acc_diff_ci95_high']:+.4f}] (paired bootstrap 95 %), McNemar exact p {get['mcnemar_p']:.3g} "
            f"({get['wins']:.0f} items only tuned right, {get['losses']:.0f} only {second})")


def paired_gate(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """`register.evidence: paired_bootstrap`: the low end of the paired interval of tuned − base accuracy, and
    of tuned − champion accuracy, must exceed `min_improvement`. The champion comparison exists only when the
    evaluate stage re-scored this very champion on the same items (its registered numbers cannot be paired)."""
    margin = params.registry.min_improvement
    if not all(paired_key("tuned", "base", stat) in metrics for stat in PAIRED_STATS):
        return False, "paired_bootstrap: evaluate reported no paired tuned − base comparison (mcq eval items needed)"
    versus_base = paired_evidence(metrics, "base")
    if not metrics[paired_key("tuned", "base", "acc_diff_ci95_low")] > margin:
        return False, f"paired_bootstrap: {versus_base}; its lower bound does not exceed min_improvement {margin}"
    if champion is None:
        return True, f"paired_bootstrap: {versus_base}; lower bound above {margin}, and there is no champion yet"
    if not all(paired_key("tuned", "champion", stat) in champion for stat in PAIRED_STATS):
        return False, ("paired_bootstrap: no paired comparison with the current champion on these items (it was not "
                       "re-scored in this run); not promoted")
    versus_champion = paired_evidence(champion, "champion")
    if not champion[paired_key("tuned", "champion", "acc_diff_ci95_low")] > margin:
        return False, f"paired_bootstrap: {versus_champion}; its lower bound does not exceed min_improvement {margin}"
    return True, f"paired_bootstrap: {versus_base}; {versus_champion}; both lower bounds above {margin}"


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
    rescored |= {k: float(v) for k, v in scored.get("paired", {}).items()}  # tuned_vs_champion_*, same items
    return rescored, f"version {champion.version} re-scored in this run on the same {scored.get('n_items')} held-out items"


def decide(params: Params, client, name: str, version, metrics: dict, scored: dict, held=None) -> tuple[bool, str, str]:
    """Apply the gate to `version` (inside the registry lock); returns (promoted, alias, reason).

    Every registry call is retried while it fails transiently and then fails the stage (registry_call); only a
    missing alias means "no champion". The writes go in an order a crash can resume from: `previous_champion`
    before the alias moves, `promotion` (the decision's record) last. `held` (the registry lock's Held) is
    checked before each write: a lock lost mid-way stops the decision before anything moves."""
    check = held.check if held is not None else (lambda: None)
    if "promotion" in version.tags:  # decided by an earlier attempt: a retry keeps that decision
        alias = next((a for a in ("champion", "challenger") if a in version.aliases), "none")
        return alias == "champion", alias, version.tags["promotion"]
    champion = champion_version(client, name)  # only a missing alias is "no champion"; an outage fails the stage
    if champion is not None and str(champion.version) == str(version.version):
        reason = "already the champion (an earlier registration of this adapter promoted it)"
        check()
        registry_call(client.set_model_version_tag, name, version.version, "promotion", reason)
        return True, "champion", reason
    champion_metrics, source = champion_metrics_for(champion, scored) if champion else (None, "none (no champion)")
    promoted, reason = promotion_decision(params, metrics, champion_metrics)
    alias = "champion" if promoted else "challenger"
    if promoted and champion is not None:
        check()
        registry_call(client.set_model_version_tag, name, version.version, "previous_champion", str(champion.version))
    check()
    registry_call(client.set_registered_model_alias, name, alias, version.version)
    check()
    registry_call(client.set_model_version_tag, name, version.version, "promotion", f"{reason}; champion numbers: {source}")
    return promoted, alias, f"{reason}; champion numbers: {source}"
