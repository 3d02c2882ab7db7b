"""friction/statistics.py on data with known answers: exact McNemar, no difference, a seeded bootstrap, Holm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from friction import statistics


def test_mcnemar_on_a_14_to_0_split_is_exact():
    entry = statistics.compare([0] * 14 + [1] * 6, [1] * 14 + [1] * 6, seed=0, yes_no=True)
    assert entry["p"] == pytest.approx(2 * 0.5**14, rel=1e-12)  # the 6 concordant pairs carry no information
    assert entry["diff"] == pytest.approx(14 / 20) and entry["n"] == 20
    assert statistics.mcnemar_exact([True] * 14, [False] * 14) == pytest.approx(2 * 0.5**14, rel=1e-12)


def test_mcnemar_with_both_directions_of_discordance():
    base = [True] * 3 + [False] * 7 + [True] * 5
    adapter = [False] * 3 + [True] * 7 + [True] * 5
    assert statistics.mcnemar_exact(base, adapter) == pytest.approx(scipy_stats.binomtest(7, 10).pvalue)
    assert 0.3 < statistics.mcnemar_exact(base, adapter) < 0.4  # 7 against 3 is not evidence of a change


@pytest.mark.parametrize("yes_no", [False, True])
def test_identical_answers_give_no_difference_and_p_one(yes_no: bool):
    values = [1, 0, 1, 1, 0, 0, 1] if yes_no else [0.5, 2.0, 3.25, 0.0, 1.0, 7.5, 2.0]
    entry = statistics.compare(values, list(values), seed=1, yes_no=yes_no)
    assert entry["diff"] == 0.0 and entry["ci95"] == [0.0, 0.0] and entry["p"] == 1.0
    assert entry["base"] == entry["adapter"] == pytest.approx(np.mean(values))


def shifted_pairs(n: int = 30, shift: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.normal(size=n)
    return base, base + shift + rng.normal(scale=0.5, size=n)


def test_a_seeded_bootstrap_is_reproducible_and_the_seed_matters():
    base, adapter = shifted_pairs()
    first, again = statistics.compare(base, adapter, seed=42), statistics.compare(base, adapter, seed=42)
    assert first == again
    other = statistics.compare(base, adapter, seed=43)
    assert other["ci95"] != first["ci95"] and other["diff"] == first["diff"]


def test_interval_and_p_agree_with_scipy_on_a_clear_shift():
    base, adapter = shifted_pairs()
    entry = statistics.compare(base, adapter, seed=5)
    differences = adapter - base
    assert entry["diff"] == pytest.approx(differences.mean())
    low, high = entry["ci95"]
    assert low < differences.mean() < high and low > 0  # a real shift of 0.4 at n = 30 is seen
    t_interval = scipy_stats.ttest_1samp(differences, 0).confidence_interval(0.95)
    assert low == pytest.approx(t_interval.low, abs=0.08) and high == pytest.approx(t_interval.high, abs=0.08)
    assert entry["p"] < 0.01 and entry["p"] >= 1 / (statistics.RESAMPLES + 1)


def test_no_shift_is_not_called_a_difference():
    rng = np.random.default_rng(11)
    base = rng.normal(size=40)
    entry = statistics.compare(base, base + rng.normal(scale=0.5, size=40), seed=5)
    assert entry["ci95"][0] < 0 < entry["ci95"][1] and entry["p"] > 0.05


def test_small_samples_are_permuted_exactly():
    # 2^5 = 32 sign patterns: differences all positive and distinct are the most extreme of them on both sides.
    entry = statistics.compare([0, 0, 0, 0, 0], [1, 2, 3, 4, 5], seed=0)
    assert entry["p"] == pytest.approx(2 / 32)


def test_weights_give_the_token_weighted_difference():
    base, adapter, tokens = [2.0, 4.0, 3.0], [1.0, 4.0, 2.0], [100, 10, 50]
    entry = statistics.compare(base, adapter, seed=0, weights=tokens)
    assert entry["base"] == pytest.approx((200 + 40 + 150) / 160)
    assert entry["diff"] == pytest.approx((-100 + 0 - 50) / 160)


def test_holm_against_a_hand_computed_example():
    assert statistics.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert statistics.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert statistics.holm([]) == []


def test_with_holm_adds_p_holm_and_holds():
    comparisons = {
        "big": statistics.compare([0] * 14, [1] * 14, seed=0, yes_no=True),
        "none": statistics.compare([1, 2, 3], [1, 2, 3], seed=0),
    }
    corrected = statistics.with_holm(comparisons)
    assert list(corrected["big"]) == ["base", "adapter", "diff", "ci95", "p", "p_holm", "n"]
    assert corrected["big"]["p_holm"] == pytest.approx(2 * 2 * 0.5**14)
    assert statistics.holds(corrected["big"]) and not statistics.holds(corrected["none"])


@pytest.mark.parametrize(
    ("base", "adapter", "yes_no", "message"),
    [([1, 2], [1], False, "same length"), ([], [], False, "no paired values"), ([0, 2], [1, 0], True, "yes/no")],
)
def test_bad_input_is_refused(base, adapter, yes_no, message):
    with pytest.raises(ValueError, match=message):
        statistics.compare(base, adapter, seed=0, yes_no=yes_no)
