"""Tests for featsim.metrics.mmd against independent float64 references."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics.pairwise import polynomial_kernel

from featsim.metrics import mmd as kid_module
from featsim.metrics.mmd import KIDResult, kid, polynomial_mmd2

RTOL = 1e-10  # float64 host path vs float64 reference: only summation order differs
# Traced path in float32 (x64 off): each kernel value carries ~1e-7 relative error, the three
# kernel means are O(1-10) and MMD^2 is their difference, so ~1e-5 relative on an O(0.1-1)
# MMD^2 is expected; the test data are shifted so MMD^2 stays far from 0.
F32_TOL = dict(rtol=1e-4, atol=1e-5)


def _features(seed, n, d, *, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return shift + scale * rng.standard_normal((n, d))


def _loop_mmd2(x, y, degree=3, gamma=None, coef0=1.0):
    """Unbiased MMD^2 with explicit loops (Gretton et al. 2012, lemma 6)."""
    n, m, d = len(x), len(y), x.shape[1]
    gamma = 1.0 / d if gamma is None else gamma

    def k(a, b):
        return (gamma * float(np.dot(a, b)) + coef0) ** degree

    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)


def _sklearn_mmd2(x, y):
    """Unbiased MMD^2 with sklearn's cubic kernel (gamma = 1/d, coef0 = 1), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    kw = dict(degree=3, gamma=1.0 / x.shape[1], coef0=1.0)
    kxx, kyy, kxy = (polynomial_kernel(a, b, **kw) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


@pytest.fixture
def float64_grams(monkeypatch):
    """kid's host Gram products in float64 too (no error budget allows float32): exact tests."""
    monkeypatch.setattr(kid_module, "_MAX_GRAM_REL_ERROR", 0.0)


def _f32_gram_bound(xs, ys, degree=3, block=256):
    """The documented worst-case error of one subset's MMD^2 with float32 block Gram products:
    degree (block + 2) u (mean kbar_xx + mean kbar_yy + 2 mean kbar_xy), u = 2^-24, with
    kbar(a, b) = (gamma |a| |b| + 1)^degree >= |k(a, b)| (off-diagonal means for xx, yy)."""
    gamma = 1.0 / xs.shape[1]

    def kbar_mean(a, b, offdiag):
        k = (gamma * np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)) + 1) ** degree
        if offdiag:
            return (k.sum() - np.trace(k)) / (len(a) * (len(a) - 1))
        return k.mean()

    scale = kbar_mean(xs, xs, True) + kbar_mean(ys, ys, True) + 2 * kbar_mean(xs, ys, False)
    return degree * (block + 2) * 2.0**-24 * scale


def _reference_kid(x, y, subset_size, num_subsets, seed):
    """The documented subset convention, drawn independently of the module."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), subset_size, replace=False)]
        ys = y[rng.choice(len(y), subset_size, replace=False)]
        values.append(_sklearn_mmd2(xs, ys))
    values = np.array(values)
    return values.mean(), values.std(ddof=0), values


# --------------------------------------------------------------------------------------------
# polynomial_mmd2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("degree", "gamma", "coef0"), [(3, None, 1.0), (2, 0.3, 0.5), (1, 1.0, 0.0)]
)
def test_polynomial_mmd2_matches_loops(degree, gamma, coef0):
    x = _features(0, 6, 3)
    y = _features(1, 8, 3, shift=0.7)
    got = polynomial_mmd2(x, y, degree=degree, gamma=gamma, coef0=coef0)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, _loop_mmd2(x, y, degree, gamma, coef0), rtol=RTOL)


def test_polynomial_mmd2_matches_sklearn_kernel():
    x = _features(2, 40, 7)
    y = _features(3, 55, 7, shift=0.3)
    np.testing.assert_allclose(polynomial_mmd2(x, y), _sklearn_mmd2(x, y), rtol=RTOL)


def test_polynomial_mmd2_int_and_float32_inputs_run_in_float64():
    x = np.arange(12).reshape(4, 3)
    y = np.arange(12, 27).reshape(5, 3)
    ref = _loop_mmd2(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(polynomial_mmd2(x, y), ref, rtol=RTOL)
    x32, y32 = _features(4, 10, 4).astype(np.float32), _features(5, 9, 4).astype(np.float32)
    ref32 = _loop_mmd2(x32.astype(np.float64), y32.astype(np.float64))
    np.testing.assert_allclose(polynomial_mmd2(x32, y32), ref32, rtol=RTOL)


def test_polynomial_mmd2_under_jit():
    x = _features(6, 30, 5).astype(np.float32)
    y = _features(7, 25, 5, shift=0.5).astype(np.float32)
    got = jax.jit(polynomial_mmd2)(x, y)
    assert got.shape == ()
    assert got.dtype == jax.dtypes.canonicalize_dtype(jnp.float64)
    np.testing.assert_allclose(float(got), _sklearn_mmd2(x, y), **F32_TOL)  # see F32_TOL


# --------------------------------------------------------------------------------------------
# kid: values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["subsets", "gram"])
@pytest.mark.parametrize("precision", ["float64", "float32_blocks"])
def test_kid_matches_reference(strategy, precision, monkeypatch):
    monkeypatch.setattr(kid_module, "_host_strategy", lambda *args: strategy)
    if precision == "float64":
        monkeypatch.setattr(kid_module, "_MAX_GRAM_REL_ERROR", 0.0)
    x = _features(10, 70, 6)
    y = _features(11, 50, 6, shift=0.4, scale=1.3)
    res = kid(x, y, subset_size=20, num_subsets=9, seed=3)
    mean, std, values = _reference_kid(x, y, 20, 9, seed=3)
    assert isinstance(res, KIDResult)
    assert isinstance(res.mean, float) and isinstance(res.std, float)
    assert (res.subset_size, res.num_subsets) == (20, 9)
    assert res.mmd2.shape == (9,) and res.mmd2.dtype == np.float64
    if precision == "float64":
        np.testing.assert_allclose(res.mmd2, values, rtol=RTOL)
        np.testing.assert_allclose(res.mean, mean, rtol=RTOL)
        np.testing.assert_allclose(res.std, std, rtol=RTOL)  # population std, ddof=0
    else:
        # float32 Gram products: within the documented worst-case bound of each subset (and in
        # practice ~1e-4 of it, since roundings do not all go one way).
        ix, iy = kid_module._subset_indices(70, 50, 20, 9, 3)
        bounds = np.array([_f32_gram_bound(x[i], y[j]) for i, j in zip(ix, iy, strict=True)])
        err = np.abs(res.mmd2 - values)
        assert np.all(err <= bounds)
        assert np.all(err <= 1e-2 * bounds)
        np.testing.assert_allclose(res.mean, mean, atol=bounds.max())
    np.testing.assert_allclose(res.std, np.std(res.mmd2, ddof=0), rtol=RTOL)


def test_kid_float32_gram_products_at_width_512():
    # Several Gram blocks (512 = 2 x 256 columns), positive "post-ReLU" features with a mean
    # larger than the spread (large inner products), float32 input as features usually are.
    rng = np.random.default_rng(14)
    x = np.abs(rng.normal(1.0, 1.0, size=(260, 512))).astype(np.float32)
    y = np.abs(rng.normal(1.1, 1.1, size=(240, 512))).astype(np.float32)
    res = kid(x, y, subset_size=200, num_subsets=4, seed=2)
    _, _, values = _reference_kid(x, y, 200, 4, seed=2)
    ix, iy = kid_module._subset_indices(260, 240, 200, 4, 2)
    bounds = np.array([_f32_gram_bound(x[i].astype(np.float64), y[j].astype(np.float64))
                       for i, j in zip(ix, iy, strict=True)])
    err = np.abs(res.mmd2 - values)
    assert np.all(err <= bounds)  # documented bound: ~5e-5 x the kernel scale
    # Observed: ~1e-5 of the bound, far below the subset-to-subset spread of MMD^2.
    assert np.all(err <= 1e-3 * bounds)
    assert err.max() < 1e-3 * values.std()


def test_kid_gram_precision_follows_the_error_bound(monkeypatch):
    # p (b + 2) u <= 1e-4 at b = 256: float32 up to degree 6, float64 beyond.
    assert kid_module._gram_dtype(3) == np.float32
    assert kid_module._gram_dtype(6) == np.float32
    assert kid_module._gram_dtype(7) == np.float64
    monkeypatch.setattr(kid_module, "_GRAM_BLOCK", 4096)  # bound 7e-4 for the cubic kernel
    assert kid_module._gram_dtype(3) == np.float64


def test_kid_host_operands_scale_exactly():
    # Power-of-two scaling into float32 range: huge and tiny features neither overflow nor
    # underflow, and the kernel comes out in the original units.
    for factor in (1e30, 1e-30):
        x = _features(15, 30, 5) * factor
        y = _features(16, 25, 5, shift=0.5) * factor
        xs, ys, unscale = kid_module._host_operands(x, y, np.dtype(np.float32))
        assert xs.dtype == np.float32 and 0.5 <= np.abs(np.vstack([xs, ys])).max() < 1.0
        gram = kid_module._host_gram(xs, ys, same=False) * unscale
        np.testing.assert_allclose(gram, x @ y.T, rtol=1e-5, atol=1e-6 * np.abs(x @ y.T).max())


def test_kid_gram_tiles_and_subset_chunks_do_not_change_result(monkeypatch):
    # Small tiles / budget force several Gram tiles (with a ragged last one) and several
    # vectorised subset chunks (7 subsets in chunks of 3).
    x = _features(12, 37, 5)
    y = _features(13, 29, 5, shift=0.2)
    ix, iy = kid_module._subset_indices(37, 29, 11, 7, 0)
    params = (3, 1.0 / 5, 1.0)
    ref = np.array([_sklearn_mmd2(x[i], y[j]) for i, j in zip(ix, iy, strict=True)])
    xs, ys, unscale = kid_module._host_operands(x, y, np.dtype(np.float64))
    monkeypatch.setattr(kid_module, "_GRAM_TILE", 8)
    got = kid_module._kid_host_gram(xs, ys, ix, iy, params, unscale)
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    per_subset = 8 * (2 * 11 * 5 + 4 * 11 * 11)
    monkeypatch.setattr(kid_module, "_HOST_CHUNK_BYTES", 3 * per_subset)
    assert kid_module._subsets_per_chunk(7, 11, 5) == 3
    got = kid_module._kid_host_subsets(xs, ys, ix, iy, params, unscale)
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    # float32 operands in blocks of 2 columns (3 blocks, a ragged last one), both strategies.
    monkeypatch.setattr(kid_module, "_GRAM_BLOCK", 2)
    xs, ys, unscale = kid_module._host_operands(x, y, np.dtype(np.float32))
    bounds = np.array([_f32_gram_bound(x[i], y[j], block=2) for i, j in zip(ix, iy, strict=True)])
    for got in (kid_module._kid_host_gram(xs, ys, ix, iy, params, unscale),
                kid_module._kid_host_subsets(xs, ys, ix, iy, params, unscale)):
        assert np.all(np.abs(got - ref) <= bounds)


def test_kid_strategy_choice():
    # Default sizes: sets of 2 x 5000 rows are cheaper via the Gram, 2 x 20000 are not.
    assert kid_module._host_strategy(5000, 5000, 1000, 100, 2048) == "gram"
    assert kid_module._host_strategy(20000, 20000, 1000, 100, 2048) == "subsets"


def test_kid_deterministic_per_seed():
    x = _features(20, 60, 4)
    y = _features(21, 60, 4, shift=0.3)
    a = kid(x, y, subset_size=15, num_subsets=5, seed=7)
    b = kid(x, y, subset_size=15, num_subsets=5, seed=7)
    c = kid(x, y, subset_size=15, num_subsets=5, seed=8)
    np.testing.assert_array_equal(a.mmd2, b.mmd2)
    assert a.mean == b.mean
    assert a.mean != c.mean


def test_kid_same_distribution_near_zero_shifted_positive():
    x = _features(30, 600, 16)
    y = _features(31, 500, 16)
    same = kid(x, y, subset_size=200, num_subsets=20)
    shifted = kid(x, y + 0.5, subset_size=200, num_subsets=20)
    # Unbiased: the same-distribution KID is noise around 0, both signs possible.
    assert abs(same.mean) < 3 * same.std
    assert shifted.mean > 0.5
    assert shifted.mean > 20 * abs(same.mean)
    assert np.all(shifted.mmd2 > 0)


def test_kid_full_sets_give_identical_subsets(float64_grams):
    # subset_size == n_x == n_y: every subset is a permutation of all rows.
    x = _features(32, 25, 3)
    y = _features(33, 25, 3, shift=1.0)
    res = kid(x, y, subset_size=25, num_subsets=4)
    np.testing.assert_allclose(res.mmd2, _sklearn_mmd2(x, y), rtol=RTOL)
    assert res.std < 1e-12 * abs(res.mean)


def test_kid_clamps_subset_size_with_warning(float64_grams):
    x = _features(40, 30, 4)
    y = _features(41, 45, 4, shift=0.5)
    with pytest.warns(UserWarning, match=r"subset_size=100.*30 rows.*45 rows.*subset_size=30"):
        res = kid(x, y, subset_size=100, num_subsets=3, seed=1)
    assert res.subset_size == 30
    mean, _, _ = _reference_kid(x, y, 30, 3, seed=1)
    np.testing.assert_allclose(res.mean, mean, rtol=RTOL)


def test_kid_accepts_jax_arrays_on_host():
    x = _features(42, 40, 4)
    y = _features(43, 35, 4, shift=0.5)
    a = kid(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), subset_size=10)
    b = kid(x.astype(np.float32), y.astype(np.float32), subset_size=10)
    assert isinstance(a.mean, float)
    assert a.mean == b.mean


# --------------------------------------------------------------------------------------------
# kid: traced path
# --------------------------------------------------------------------------------------------


def test_kid_under_jit_matches_host():
    x = _features(50, 80, 8).astype(np.float32)
    y = _features(51, 60, 8, shift=0.4).astype(np.float32)
    opts = dict(subset_size=25, num_subsets=7, seed=5)
    jitted = jax.jit(functools.partial(kid, **opts))
    got = jitted(x, y)
    host = kid(x, y, **opts)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is enabled
    assert isinstance(got, KIDResult)
    assert got.mean.shape == () and got.std.shape == () and got.mmd2.shape == (7,)
    assert got.mean.dtype == dtype and got.mmd2.dtype == dtype
    assert int(got.subset_size) == 25 and int(got.num_subsets) == 7
    # Looser than RTOL: float32 traced path, see F32_TOL.
    np.testing.assert_allclose(np.asarray(got.mmd2), host.mmd2, **F32_TOL)
    np.testing.assert_allclose(float(got.mean), host.mean, **F32_TOL)
    np.testing.assert_allclose(float(got.std), host.std, **F32_TOL)


def test_kid_under_jit_clamps_and_batches(monkeypatch):
    x = _features(52, 12, 3).astype(np.float32)
    y = _features(53, 20, 3, shift=1.0).astype(np.float32)
    # Budget of one float64 subset of 12 rows -> lax.map batches of 2 float32 subsets; 5 subsets
    # leave a remainder batch.
    monkeypatch.setattr(kid_module, "_HOST_CHUNK_BYTES", 8 * (2 * 12 * 3 + 4 * 12 * 12))
    jitted = jax.jit(functools.partial(kid, subset_size=50, num_subsets=5, seed=0))
    with pytest.warns(UserWarning, match="12 rows"):
        got = jitted(x, y)
    with pytest.warns(UserWarning):
        host = kid(x, y, subset_size=50, num_subsets=5, seed=0)
    np.testing.assert_allclose(np.asarray(got.mmd2), host.mmd2, **F32_TOL)  # see F32_TOL


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_dim_mismatch_names_both_dims():
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 4 while y.shape\[1\] == 6"):
        kid(np.ones((5, 4)), np.ones((5, 6)))
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 4 while y.shape\[1\] == 6"):
        polynomial_mmd2(np.ones((5, 4)), np.ones((5, 6)))


def test_nan_rows_rejected():
    y = _features(60, 10, 3)
    y[[2, 5], 1] = np.nan
    with pytest.raises(ValueError, match="y has 2 row"):
        kid(_features(61, 10, 3), y)
    x = _features(62, 10, 3)
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="x has 1 row"):
        polynomial_mmd2(x, _features(63, 10, 3))


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((2, 3, 4)), np.ones((1, 3))])
def test_bad_shapes_rejected(bad):
    with pytest.raises(ValueError, match="x "):
        kid(bad, np.ones((5, 3)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(subset_size=1), "subset_size must be >= 2"),
        (dict(subset_size=10.0), "subset_size must be an integer"),
        (dict(num_subsets=0), "num_subsets must be >= 1"),
        (dict(num_subsets=True), "num_subsets must be an integer"),
    ],
)
def test_kid_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kid(np.ones((5, 3)), np.ones((5, 3)), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(degree=0), "degree must be >= 1"),
        (dict(degree=2.5), "degree must be an integer"),
        (dict(gamma=-1.0), "gamma must be"),
        (dict(gamma=float("nan")), "gamma must be"),
        (dict(coef0=-0.5), "coef0 must be"),
    ],
)
def test_polynomial_mmd2_bad_kernel_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        polynomial_mmd2(np.ones((5, 3)), np.ones((5, 3)), **kwargs)
