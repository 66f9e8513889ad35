"""D(F_C, F_M), within-domain baselines and energy distance against float64 SciPy references."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import cdist

from featsim.metrics import distance as dist
from featsim.metrics.distance import (
    METRICS,
    average_distance,
    distance_summary,
    energy_distance,
    within_distance,
)


def _features(rng, n, d, *, shift=0.0, scale=1.0, dtype=np.float32):
    # A non-zero mean and uneven scales: the cases where the ||x||^2 + ||y||^2 - 2xy
    # expansion loses digits if nothing is done about it.
    cols = np.linspace(0.5, 2.0, d)
    return ((rng.normal(size=(n, d)) * cols * scale) + shift + 3.0).astype(dtype)


def _ref_mean(x, y, metric):
    return cdist(np.float64(x), np.float64(y), metric).mean()


def _ref_within(x, metric):
    n = len(x)
    return cdist(np.float64(x), np.float64(x), metric).sum() / (n * (n - 1))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_average_distance_matches_cdist(metric, dtype):
    rng = np.random.default_rng(0)
    x = _features(rng, 301, 48, dtype=dtype)
    y = _features(rng, 257, 48, shift=0.4, scale=1.3, dtype=dtype)
    # Small tiles so that several tiles, padding and both scan axes are exercised.
    got = average_distance(x, y, metric=metric, block_size=64)
    assert isinstance(got, float)
    # The bar: float32 inputs agree with float64 cdist to 1e-6 relative.
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, _ref_mean(x, y, metric), rtol=rtol)


@pytest.mark.parametrize("metric", METRICS)
def test_within_distance_matches_cdist(metric):
    rng = np.random.default_rng(1)
    x = _features(rng, 203, 40)
    got = within_distance(x, metric=metric, block_size=50)
    np.testing.assert_allclose(got, _ref_within(x, metric), rtol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_same_object_counts_diagonal_as_exact_zero(metric):
    rng = np.random.default_rng(2)
    x = _features(rng, 97, 30)
    n = len(x)
    got = average_distance(x, x, metric=metric, block_size=32)
    np.testing.assert_allclose(got, _ref_within(x, metric) * (n - 1) / n, rtol=1e-6)


def test_large_offset_features_float32():
    # Post-ReLU-like features: mean 50x the spread. Centring keeps float32 accurate.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(200, 64)) + 50.0).astype(np.float32)
    y = (rng.normal(size=(150, 64)) + 50.2).astype(np.float32)
    np.testing.assert_allclose(
        average_distance(x, y, block_size=64), _ref_mean(x, y, "euclidean"), rtol=1e-6
    )
    np.testing.assert_allclose(within_distance(x), _ref_within(x, "euclidean"), rtol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_under_jit(metric):
    rng = np.random.default_rng(4)
    x = _features(rng, 70, 16)
    y = _features(rng, 50, 16, shift=1.0)
    f = jax.jit(functools.partial(average_distance, metric=metric, block_size=32))
    out = f(x, y)
    assert out.shape == () and out.dtype == np.float32
    # float32 accumulation inside a user's jit (x64 off): looser than the host path.
    np.testing.assert_allclose(float(out), _ref_mean(x, y, metric), rtol=2e-5)
    w = jax.jit(functools.partial(within_distance, metric=metric, block_size=32))(x)
    assert w.shape == ()
    np.testing.assert_allclose(float(w), _ref_within(x, metric), rtol=2e-5)
    e = jax.jit(functools.partial(energy_distance, metric=metric, block_size=32))(x, y)
    assert e.shape == ()
    np.testing.assert_allclose(float(e), _ref_energy(x, y, metric), rtol=1e-3, atol=1e-4)


def _ref_energy(x, y, metric):
    return 2 * _ref_mean(x, y, metric) - _ref_mean(x, x, metric) - _ref_mean(y, y, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_energy_distance_and_summary(metric):
    rng = np.random.default_rng(5)
    x = _features(rng, 120, 24, dtype=np.float64)
    y = _features(rng, 90, 24, shift=0.7, dtype=np.float64)
    ref = _ref_energy(x, y, metric)
    np.testing.assert_allclose(energy_distance(x, y, metric=metric), ref, rtol=1e-9)
    s = distance_summary(x, y, metric=metric, block_size=32)
    np.testing.assert_allclose(s.between, _ref_mean(x, y, metric), rtol=1e-12)
    np.testing.assert_allclose(s.within_x, _ref_within(x, metric), rtol=1e-12)
    np.testing.assert_allclose(s.within_y, _ref_within(y, metric), rtol=1e-12)
    np.testing.assert_allclose(s.energy, ref, rtol=1e-9)
    np.testing.assert_allclose(s.ratio, s.between / ((s.within_x + s.within_y) / 2))
    np.testing.assert_allclose(s.energy_coefficient, ref / (2 * s.between), rtol=1e-9)
    assert 0 <= s.energy_coefficient <= 1
    assert (s.n_x, s.n_y, s.metric) == (120, 90, metric)


def test_energy_detects_distribution_change_that_d_misses():
    # Same mean, different spread: D barely moves relative to the within-set baseline,
    # energy is clearly positive; identical distributions give energy ~ 0.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 8))
    y_same = rng.normal(size=(400, 8))
    y_wide = rng.normal(size=(400, 8)) * 2.0
    e_same = energy_distance(x, y_same)
    e_wide = energy_distance(x, y_wide)
    assert e_wide > 10 * abs(e_same)
    assert energy_distance(x, x) == 0.0


def test_scale_free_forms_are_invariant_to_rescaling():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(100, 12))
    y = rng.normal(size=(80, 12)) + 0.5
    a = distance_summary(x, y)
    b = distance_summary(3.0 * x, 3.0 * y)
    np.testing.assert_allclose(b.between, 3.0 * a.between, rtol=1e-12)
    np.testing.assert_allclose(b.ratio, a.ratio, rtol=1e-12)
    np.testing.assert_allclose(b.energy_coefficient, a.energy_coefficient, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    data=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12),
        elements=st.floats(-100, 100, allow_nan=False, width=64),
    ),
    metric=st.sampled_from(["euclidean", "sqeuclidean", "cityblock"]),
)
def test_symmetric_and_matches_reference(data, metric):
    half = max(1, len(data) // 2)
    x, y = data[:half], data[half:] if len(data) > half else data[:1]
    dxy = average_distance(x, y, metric=metric, block_size=4)
    dyx = average_distance(y, x, metric=metric, block_size=4)
    ref = _ref_mean(x, y, metric)
    np.testing.assert_allclose(dxy, dyx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dxy, ref, rtol=1e-9, atol=1e-6)


def test_no_n_by_m_matrix_is_materialised(monkeypatch):
    # Host path: record every Gram tile; none is n x m, all fit block x 8 block.
    shapes = []
    real = dist._tile_gram_jit

    def spy(xb, yb):
        g = real(xb, yb)
        shapes.append(g.shape)
        return g

    monkeypatch.setattr(dist, "_tile_gram_jit", spy)
    x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(900, 8)).astype(np.float32)
    got = average_distance(x, y, block_size=64)
    np.testing.assert_allclose(got, _ref_mean(x, y, "euclidean"), rtol=1e-6)
    assert shapes and max(a * b for a, b in shapes) <= 64 * 16 * 64
    assert len(shapes) == -(-1000 // 64) * -(-900 // (16 * 64))
    assert all(s[1] < 900 + 8 for s in shapes)
    # Within-set sums visit only the tiles on or above the diagonal.
    shapes.clear()
    within_distance(x, block_size=100)
    assert len(shapes) == 10 * 11 // 2
    # Traced path: the compiled program's largest buffer is a tile, not n x m.
    f = jax.jit(functools.partial(average_distance, block_size=128))
    text = f.lower(x, y).compile().as_text()
    assert "f32[1000,900]" not in text and "f32[900,1000]" not in text
    assert "f32[128,904]" in text  # a 128-row tile against all 900 columns (padded to 8s)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((3,)), np.zeros((3, 2)), r"x must have shape \[n, d\], got shape \(3,\)"),
        (np.zeros((3, 2)), np.zeros((3, 4)), r"x.shape\[1\] == 2 while y.shape\[1\] == 4"),
        (np.zeros((0, 2)), np.zeros((3, 2)), r"at least 1 rows"),
        (np.array([[1.0, np.nan], [1, 2], [np.inf, 0]]), np.zeros((3, 2)), r"2 row\(s\) with NaN"),
    ],
)
def test_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        average_distance(x, y)


def test_bad_options():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="metric must be one of"):
        average_distance(x, x, metric="chebyshev")
    with pytest.raises(ValueError, match="block_size"):
        average_distance(x, x, block_size=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        within_distance(x[:1])
    with pytest.raises(ValueError, match="1 such row"):
        average_distance(np.array([[0.0, 0.0], [1.0, 1.0]]), x, metric="cosine")
