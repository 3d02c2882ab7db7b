"""Paired comparisons of base and adapter: is a difference larger than the noise of the prompts that measured it?

Every comparison is paired: the same prompts (or validation examples) scored for both models, so the unit of
analysis is the per-item difference, adapter minus base. For each metric:

- ``diff``: the mean per-item difference (for validation loss, the token-weighted difference: the change of the
  loss as evaluate reports it);
- ``ci95``: a 95 % bootstrap confidence interval of that difference over items, bias-corrected and accelerated
  (BCa), ``RESAMPLES`` resamples from a seeded generator, by ``scipy.stats.bootstrap``;
- ``p``: two-sided. For a yes/no metric with one answer per item (push-back, think block closed), the exact McNemar
  test: a binomial test of the discordant pairs (``scipy.stats.binomtest``). Otherwise a paired permutation test,
  the signs of the differences flipped at random (``scipy.stats.permutation_test``, exact when 2^n is at most the
  resample count);
- ``p_holm``: Holm's step-down correction over all metrics of one report (``holm``), so "holds after correction"
  means p_holm < ``ALPHA`` with the family-wise error rate held at 5 %.

Identical base and adapter values give diff 0, the interval [0, 0] and p = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 10_000
ALPHA = 0.05
CI_METHOD = "BCa"
METHOD = {
    "ci95": f"{CI_METHOD} bootstrap over items, {RESAMPLES:,} resamples, seeded",
    "p": "two-sided paired permutation test (random sign flips of the per-item differences)",
    "p_yes_no": "exact McNemar test (a binomial test of the pairs that disagree) when each prompt has one answer",
    "p_holm": "Holm's step-down correction across the metrics of the table",
}


def mcnemar_exact(base: Sequence[bool], adapter: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value of paired yes/no outcomes: only the pairs that disagree carry information."""
    base_only = sum(1 for b, a in zip(base, adapter, strict=True) if b and not a)
    adapter_only = sum(1 for b, a in zip(base, adapter, strict=True) if a and not b)
    if base_only + adapter_only == 0:
        return 1.0
    return float(stats.binomtest(adapter_only, base_only + adapter_only, 0.5).pvalue)


def _weighted_mean_difference(differences: np.ndarray, weights: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(differences * weights, axis=axis) / np.sum(weights, axis=axis)


def bootstrap_ci(
    differences: np.ndarray, weights: np.ndarray, seed: int, resamples: int = RESAMPLES
) -> tuple[float, float]:
    """The 95 % BCa interval of the weighted mean difference, resampling items (difference and weight together)."""
    if np.all(differences == differences[0]):  # no spread: every resample gives the same value (BCa is undefined)
        return float(differences[0]), float(differences[0])
    result = stats.bootstrap(
        (differences, weights),
        _weighted_mean_difference,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=0.95,
        method=CI_METHOD,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def permutation_p(differences: np.ndarray, weights: np.ndarray, seed: int, resamples: int = RESAMPLES) -> float:
    """Two-sided p of the weighted mean difference under random sign flips (base and adapter swapped per item)."""
    if np.all(differences == 0):
        return 1.0
    weighted = differences * weights  # a sign flip of an item flips its weighted difference; the total weight stays

    def statistic(values: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(values, axis=axis) / weights.sum()

    result = stats.permutation_test(
        (weighted,),
        statistic,
        permutation_type="samples",  # with one sample: the signs of the observations are flipped
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(result.pvalue, 1.0))


def compare(
    base: Sequence[float],
    adapter: Sequence[float],
    seed: int,
    weights: Sequence[float] | None = None,
    yes_no: bool = False,
    resamples: int = RESAMPLES,
) -> dict:
    """base, adapter, diff, ci95, p and n of paired per-item values; p_holm is added by `with_holm`.

    `weights` (validation loss: trained tokens per example) make every figure a weighted mean. `yes_no` asks for the
    exact McNemar test, which needs values of 0 and 1 only.
    """
    base_values, adapter_values = np.asarray(base, dtype=float), np.asarray(adapter, dtype=float)
    if base_values.shape != adapter_values.shape or base_values.ndim != 1:
        raise ValueError(f"paired values need the same length, got {base_values.shape} and {adapter_values.shape}")
    if len(base_values) == 0:
        raise ValueError("no paired values to compare")
    item_weights = np.ones_like(base_values) if weights is None else np.asarray(weights, dtype=float)
    differences = adapter_values - base_values
    if yes_no:
        if not set(np.unique(np.concatenate([base_values, adapter_values]))) <= {0.0, 1.0}:
            raise ValueError("McNemar's test needs yes/no values (0 or 1)")
        p_value = mcnemar_exact(base_values.astype(bool), adapter_values.astype(bool))
    else:
        p_value = permutation_p(differences, item_weights, seed, resamples)
    low, high = bootstrap_ci(differences, item_weights, seed, resamples)
    return {
        "base": float(np.average(base_values, weights=item_weights)),
        "adapter": float(np.average(adapter_values, weights=item_weights)),
        "diff": float(_weighted_mean_difference(differences, item_weights)),
        "ci95": [low, high],
        "p": p_value,
        "n": len(base_values),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    The k-th smallest of m p-values is multiplied by (m - k + 1); the adjusted values are then made non-decreasing
    in that order (an adjusted p is never below that of a smaller raw p) and capped at 1.
    """
    order = np.argsort(p_values, kind="stable")
    count = len(p_values)
    adjusted = np.empty(count)
    running_max = 0.0
    for rank, index in enumerate(order):
        running_max = max(running_max, (count - rank) * p_values[index])
        adjusted[index] = min(running_max, 1.0)
    return adjusted.tolist()


def with_holm(comparisons: dict[str, dict]) -> dict[str, dict]:
    """The comparisons with ``p_holm`` added, Holm-corrected across all of them, keys in the documented order."""
    names = list(comparisons)
    adjusted = holm([comparisons[name]["p"] for name in names])
    result = {}
    for name, p_holm in zip(names, adjusted, strict=True):
        entry = comparisons[name]
        result[name] = {
            **{key: entry[key] for key in ("base", "adapter", "diff", "ci95", "p")},
            "p_holm": p_holm,
            "n": entry["n"],
        }
    return result


def rounded(comparisons: dict[str, dict], digits: int = 4) -> dict[str, dict]:
    """Figures rounded for a metrics file (p-values keep their significant digits: 2·0.5^14 is 1.2e-4).

    The interval is also written as two numbers, ``ci95_low`` and ``ci95_high``: DVC leaves lists out of
    `dvc exp show`, `dvc metrics show` and `dvc metrics diff`, and `make compare` shows them."""

    def significant(value: float) -> float:
        return float(f"{value:.4g}")

    return {
        name: {
            "base": round(entry["base"], digits),
            "adapter": round(entry["adapter"], digits),
            "diff": round(entry["diff"], digits),
            "ci95": [round(bound, digits) for bound in entry["ci95"]],
            "ci95_low": round(entry["ci95"][0], digits),
            "ci95_high": round(entry["ci95"][1], digits),
            "p": significant(entry["p"]),
            "p_holm": significant(entry["p_holm"]),
            "n": entry["n"],
        }
        for name, entry in comparisons.items()
    }


def holds(entry: dict) -> bool:
    """Whether a difference holds after Holm's correction."""
    return entry["p_holm"] < ALPHA
