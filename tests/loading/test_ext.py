import numpy as np
import pytest

from rela import _ext


def test_extension_is_built():
    # The README's set-up builds rela._C; a missing build would silently use the slow path.
    assert _ext.has_extension()


@pytest.mark.parametrize("n", [0, 1, 2, 17, 10_000])
def test_permutation_is_a_permutation(n):
    p = _ext.permutation(n, seed=123)
    assert p.dtype == np.int64 and p.shape == (n,)
    assert np.array_equal(np.sort(p), np.arange(n))


def test_permutation_is_seeded():
    a, b, c = (_ext.permutation(1000, s) for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_python_fallback_gives_the_same_stream(monkeypatch):
    compiled = _ext.permutation(3000, seed=2**63 + 5)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not built"):
        fallback = _ext.permutation(3000, seed=2**63 + 5)
    assert np.array_equal(compiled, fallback)


def test_permutation_is_roughly_uniform():
    # Position of element 0 over many seeds: every slot about equally likely.
    n, trials = 5, 5000
    counts = np.zeros(n)
    for s in range(trials):
        counts[int(np.flatnonzero(_ext.permutation(n, s) == 0)[0])] += 1
    expected = trials / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.0  # df=4: p ~ 5e-4
