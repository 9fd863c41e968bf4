import numpy as np
import pytest

from rela.data.pca import StreamingMoments, fit_whitening


def _data(n=3000, D=24, seed=0):
    rng = np.random.default_rng(seed)
    # Correlated features with a large offset: the case where naive sum-of-squares loses digits.
    mix = rng.normal(size=(D, D)) * np.geomspace(10, 0.01, D)[:, None]
    return (rng.normal(size=(n, D)) @ mix + 1e4).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 7, 500, 3000])
def test_streaming_moments_match_float64_reference(chunk):
    x = _data()
    m = StreamingMoments(x.shape[1])
    for s in range(0, len(x), chunk):
        m.update(x[s:s + chunk])
    ref = x.astype(np.float64)
    assert m.n == len(x)
    np.testing.assert_allclose(m.mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(ref, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)


def test_merge_equals_sequential():
    x = _data()
    a, b, whole = StreamingMoments(24), StreamingMoments(24), StreamingMoments(24)
    a.update(x[:1234])
    b.update(x[1234:])
    whole.update(x)
    a.merge(b)
    np.testing.assert_allclose(a.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(a.scatter, whole.scatter, rtol=1e-9)


def test_whitening_is_zero_mean_unit_variance_and_spans_the_top_subspace():
    x = _data()
    m = StreamingMoments(x.shape[1])
    m.update(x)
    d = 8
    w = fit_whitening(m, d)
    z = w.transform(x).astype(np.float64)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(d), atol=2e-3)
    # Same subspace as numpy's SVD of the centred data, each component equal up to sign.
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    for j in range(d):
        assert abs(abs(float(w.components[j] @ vt[j])) - 1) < 1e-4
    np.testing.assert_allclose(w.eigenvalues, (s[:d] ** 2) / len(x), rtol=1e-6)


def test_sign_convention_is_deterministic():
    x = _data()
    m1, m2 = StreamingMoments(24), StreamingMoments(24)
    m1.update(x)
    m2.update(x[::-1].copy())
    c1, c2 = fit_whitening(m1, 5).components, fit_whitening(m2, 5).components
    np.testing.assert_allclose(c1, c2, atol=1e-5)


def test_degenerate_directions_give_zeros_not_nan():
    rng = np.random.default_rng(0)
    x = np.zeros((100, 6), np.float32)
    x[:, :2] = rng.normal(size=(100, 2))  # rank 2, four dead dimensions
    m = StreamingMoments(6)
    m.update(x)
    z = fit_whitening(m, 6).transform(x)
    assert np.isfinite(z).all()
    assert np.abs(z[:, 2:]).max() < 1e-2
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-3)


def test_dim_out_of_range():
    m = StreamingMoments(4)
    m.update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="dim"):
        fit_whitening(m, 5)
