"""components.analysis against hand-made data: the Gao et al. fit, its peak, the proxy/gold split, the frontier."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.analysis import fit_gao_rl, gao_rl, overoptimization_onset, pareto_front


def test_gao_curve_by_hand():
    # R(d) = d (α − β ln d): at d = 1 the log vanishes, at d = e it subtracts β·e, at 0 it is 0.
    assert gao_rl([0.0, 1.0, math.e], alpha=2.0, beta=0.5) == pytest.approx([0.0, 2.0, math.e * 1.5])


def test_fit_recovers_alpha_and_beta_from_exact_points():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    fit = fit_gao_rl(d, gao_rl(d, alpha=1.2, beta=0.6))
    assert (fit.alpha, fit.beta) == pytest.approx((1.2, 0.6), abs=1e-9)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.n_points == 7
    # dR/dd = α − β − β ln d = 0  →  d* = exp(α/β − 1) = e, R(d*) = β d*
    assert fit.peak_d == pytest.approx(math.e) and fit.peak_kl == pytest.approx(math.e**2)
    assert fit.peak_reward == pytest.approx(0.6 * math.e)
    assert fit(fit.peak_d) == pytest.approx(fit.peak_reward)


def test_fit_recovers_alpha_and_beta_from_noisy_points():
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 5.0, 60)
    fit = fit_gao_rl(d, gao_rl(d, alpha=0.8, beta=0.3) + rng.normal(0, 0.01, d.size))
    assert fit.alpha == pytest.approx(0.8, abs=0.02) and fit.beta == pytest.approx(0.3, abs=0.02)


def test_fit_with_no_downturn_has_no_peak():
    d = [0.5, 1.0, 2.0]
    fit = fit_gao_rl(d, [0.5, 1.0, 2.0])  # a straight line: α = 1, β = 0
    assert fit.alpha == pytest.approx(1.0) and fit.beta == pytest.approx(0.0, abs=1e-12)
    assert fit_gao_rl(d, gao_rl(d, 1.0, -0.2)).peak_d is None


@pytest.mark.parametrize("d, gain", [([0.0, 1.0], [0.0, 1.0]), ([1.0, 1.0], [1.0, 2.0]), ([-1.0, 1.0], [0, 0]),
                                     ([1.0, 2.0], [1.0])])
def test_fit_refuses_what_cannot_determine_two_parameters(d, gain):
    with pytest.raises(ValueError):
        fit_gao_rl(d, gain)


def test_onset_is_where_proxy_keeps_rising_and_gold_falls():
    d = [2.0, 0.5, 1.0, 3.0]  # unsorted on purpose
    proxy = [0.9, 0.2, 0.5, 1.4]
    gold = [0.3, 0.2, 0.4, 0.1]  # gold peaks at d = 1.0, then falls while the proxy climbs
    assert overoptimization_onset(d, proxy, gold) == 1.0
    assert overoptimization_onset(d, proxy, [0.1, 0.0, 0.05, 0.2]) is None  # both rise: no hacking seen
    assert overoptimization_onset(d, [0.1, 0.3, 0.2, 0.0], gold) is None  # both fall together: no split


def test_pareto_front_keeps_the_undominated_points():
    kl = [1.0, 2.0, 3.0, 0.5, 2.5]
    reward = [0.4, 0.3, 0.9, 0.1, 0.6]
    assert pareto_front(kl, reward) == [3, 0, 4, 2]
