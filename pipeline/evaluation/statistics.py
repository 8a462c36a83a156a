"""Interval estimates and small statistics for the reported metrics (scipy, not hand-written).
"""

from __future__ import annotations


def accuracy_ci95(correct: int, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of an accuracy of correct/n (scipy's binomtest)."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
