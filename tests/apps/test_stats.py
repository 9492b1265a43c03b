"""Evaluation statistics against an independent binomial (torch.distributions, lgamma-based) and hand-checked
cases (scipy is not installed here)."""

import math
import random

import pytest

from tinylora_verl.apps import stats


def test_mcnemar_matches_an_independent_binomial_test():
    import torch

    a = {i: i % 3 == 0 for i in range(60)}
    b = {i: i % 3 == 0 or i % 7 == 1 for i in range(60)}
    b[0] = False
    got = stats.mcnemar_exact(a, b)
    n01, n10 = got["n01"], got["n10"]
    assert (n01, n10) == (sum(1 for i in a if b[i] and not a[i]), 1)
    binomial = torch.distributions.Binomial(n01 + n10, probs=torch.tensor(0.5, dtype=torch.float64))
    tail = binomial.log_prob(torch.arange(min(n01, n10) + 1, dtype=torch.float64)).exp().sum().item()
    assert got["p_mcnemar"] == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_mcnemar_hand_checked_cases():
    # 5 discordant problems all in b's favour: p = 2 / 2^5
    assert stats.mcnemar_exact({i: False for i in range(5)}, {i: True for i in range(5)})["p_mcnemar"] == 2 / 32
    # no discordant problem: no evidence either way
    assert stats.mcnemar_exact({0: True, 1: False}, {0: True, 1: False})["p_mcnemar"] == 1.0


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_problems():
    rng = random.Random(0)
    small = [float(rng.random() < 0.3) for _ in range(50)]
    large = [float(rng.random() < 0.3) for _ in range(2000)]
    lo_s, hi_s = stats.bootstrap_interval(small, seed=1)
    lo_l, hi_l = stats.bootstrap_interval(large, seed=1)
    assert lo_s <= sum(small) / 50 <= hi_s and lo_l <= sum(large) / 2000 <= hi_l
    # the normal approximation's width 2·1.96·sqrt(p(1-p)/n) within 15%
    p = sum(large) / 2000
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 2000), rel=0.15)
    assert hi_s - lo_s > 3 * (hi_l - lo_l)
    assert stats.bootstrap_interval(small, seed=1) == (lo_s, hi_s), "seeded"
    assert stats.bootstrap_interval([]) == (None, None)


def test_paired_bootstrap_sees_a_shift_only_where_there_is_one():
    a = {i: float(i % 2) for i in range(200)}
    same = stats.paired_bootstrap(a, dict(a))
    assert same["diff"] == 0 and same["p_bootstrap"] == 1.0
    better = {i: 1.0 if i % 4 == 0 else v for i, v in a.items()}  # 50 problems flip 0 -> 1
    got = stats.paired_bootstrap(a, better, seed=3)
    assert got["diff"] == pytest.approx(0.25) and got["diff_low"] > 0.15 and got["p_bootstrap"] < 0.01
    with pytest.raises(ValueError, match="share no problem"):
        stats.paired_bootstrap({0: 1.0}, {1: 1.0})


def test_compare_modes_pairs_each_mode_with_base_on_the_same_problems():
    rows = []
    for mode, flip in (("base", False), ("merged", True)):
        for i in range(40):
            correct = (i % 2 == 0) or (flip and i % 4 == 1)
            rows.append({"benchmark": "gsm8k", "decoding": "greedy", "mode": mode, "index": i, "correct": correct})
            for k in range(2):
                rows.append({"benchmark": "gsm8k", "decoding": "sampled", "mode": mode, "index": i,
                             "correct": correct and k == 0})
    out = {r["decoding"]: r for r in stats.compare_modes(rows)}
    assert set(out) == {"greedy", "sampled"} and all(r["mode"] == "merged" for r in out.values())
    greedy = out["greedy"]
    assert (greedy["n01"], greedy["n10"]) == (10, 0) and greedy["p_mcnemar"] == pytest.approx(2 / 2 ** 10)
    assert greedy["diff"] == pytest.approx(0.25) and greedy["acc"] == 0.75 and greedy["reference_acc"] == 0.5
    assert out["sampled"]["p_mcnemar"] is None and out["sampled"]["diff"] == pytest.approx(0.125)


def test_bad_levels_and_resample_counts_are_refused():
    with pytest.raises(ValueError, match="level should be in \\(0, 1\\), but the value passed is 1.5"):
        stats.bootstrap_interval([1.0], level=1.5)
    with pytest.raises(ValueError, match="resamples should be >= 100"):
        stats.paired_bootstrap({0: 1.0}, {0: 1.0}, resamples=10)
