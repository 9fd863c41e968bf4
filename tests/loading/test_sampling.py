"""The compiled index samplers: correctness, determinism, statistics, and the Python fallback."""

import itertools

import numpy as np
import pytest

from rela import _ext


def test_uniform_subset_is_distinct_and_seeded():
    a = _ext.uniform_subset(1000, 300, seed=4)
    assert len(set(a.tolist())) == 300 and a.min() >= 0 and a.max() < 1000
    assert np.array_equal(a, _ext.uniform_subset(1000, 300, seed=4))
    assert not np.array_equal(a, _ext.uniform_subset(1000, 300, seed=5))
    assert len(_ext.uniform_subset(10, 10, 0)) == 10 and len(_ext.uniform_subset(10, 0, 0)) == 0
    with pytest.raises(ValueError):
        _ext.uniform_subset(5, 6, 0)


def test_uniform_subset_inclusion_is_uniform():
    n, k, trials = 10, 3, 6000
    counts = np.zeros(n)
    for s in range(trials):
        counts[_ext.uniform_subset(n, k, s)] += 1
    expected = trials * k / n
    assert (((counts - expected) ** 2) / expected).sum() < 30  # df=9, p ~ 4e-4


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_weighted_subset_is_deterministic_across_thread_counts(threads):
    w = np.random.default_rng(0).random(200_000).astype(np.float32)
    ref = _ext.weighted_subset(w, 50_000, seed=9, threads=1)
    got = _ext.weighted_subset(w, 50_000, seed=9, threads=threads)
    assert np.array_equal(ref, got)
    assert len(np.unique(got)) == 50_000 and np.all(np.diff(got) > 0)


def test_weighted_subset_never_draws_zero_weights():
    w = np.ones(1000, np.float32)
    w[::3] = 0
    w[5] = np.nan
    got = _ext.weighted_subset(w, 600, seed=1)
    assert np.all(w[got] == 1)
    with pytest.raises(ValueError, match="positive"):
        _ext.weighted_subset(w, 700, seed=1)


def _exact_inclusion(w, k):
    """P(i in sample) for successive sampling without replacement, by enumerating draw orders."""
    n = len(w)
    p = np.zeros(n)
    for order in itertools.permutations(range(n), k):
        prob, left = 1.0, w.sum()
        for i in order:
            prob *= w[i] / left
            left -= w[i]
        p[list(order)] += prob
    return p


def test_weighted_inclusion_probabilities_match_the_weights():
    w = np.array([5.0, 1.0, 2.0, 0.5, 3.0, 0.0], np.float32)
    k, trials = 2, 20_000
    counts = np.zeros(len(w))
    for s in range(trials):
        counts[_ext.weighted_subset(w, k, seed=s)] += 1
    exact = _exact_inclusion(w.astype(np.float64), k)
    assert counts[5] == 0
    live = exact > 0
    chi2 = (((counts[live] - trials * exact[live]) ** 2) / (trials * exact[live])).sum()
    assert chi2 < 25  # df <= 5, p ~ 1e-4
    np.testing.assert_allclose(counts / trials, exact, atol=0.015)


def test_python_fallbacks_give_the_same_results(monkeypatch):
    w = np.random.default_rng(3).random(3000).astype(np.float32)
    w[::7] = 0
    compiled = (_ext.uniform_subset(500, 200, 11), _ext.weighted_subset(w, 1200, 11, threads=2))
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_warned", True)
    assert np.array_equal(_ext.uniform_subset(500, 200, 11), compiled[0])
    assert np.array_equal(_ext.weighted_subset(w, 1200, 11), compiled[1])
