"""Tests for featsim.metrics.cka against independent naive float64 references."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featsim.metrics.cka import (
    CKAMatrix,
    MinibatchCKA,
    cka_matrix,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)

# float64 host path against float64 references: only summation-order rounding differs.
RTOL64 = 1e-10
# Under jax.jit the kernels run in float32 (x64 disabled): Gram sums over n*d products
# lose ~sqrt(n d) * 1.2e-7 relative, and the debiased estimator subtracts nearly equal
# terms, so 1e-4 leaves a safety margin of ~10x over what we observe.
RTOL32 = 1e-4
ATOL32 = 1e-5


# --------------------------------------------------------------------------------------
# Independent references: explicit loops, explicit centring matrix, Song et al.'s formula.
# --------------------------------------------------------------------------------------


def naive_linear_gram(x):
    n = x.shape[0]
    k = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            k[i, j] = sum(float(a) * float(b) for a, b in zip(x[i], x[j], strict=True))
    return k


def naive_rbf_gram(x, threshold=1.0):
    n = x.shape[0]
    d2 = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            d2[i, j] = sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j], strict=True))
    # Kornblith et al.'s gram_rbf: median over all n*n squared distances.
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def naive_hsic_biased(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def naive_hsic_unbiased(k, l):
    """Song et al. (2012), eq. 5: the U-statistic HSIC_1."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def naive_cka(k, l, debiased=False):
    hsic = naive_hsic_unbiased if debiased else naive_hsic_biased
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def naive_linear_cka(x, y, debiased=False):
    # Uncentred Grams on purpose: both estimators are invariant to the feature means.
    return naive_cka(naive_linear_gram(x), naive_linear_gram(y), debiased)


def naive_rbf_cka(x, y, threshold=1.0, debiased=False):
    return naive_cka(naive_rbf_gram(x, threshold), naive_rbf_gram(y, threshold), debiased)


def make_pair(n, d1, d2, seed=0, noise=1.0):
    """Correlated x [n, d1], y [n, d2] with non-zero means (exercises the centring)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + rng.normal(size=d1) * 3
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + noise * rng.normal(size=(n, d2)) - 2.0
    return x, y


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------------------
# Agreement with the references (host, float64).
# --------------------------------------------------------------------------------------

# (n, d1, d2): d1 + d2 < n takes the [d, d] feature-space form, otherwise the [n, n] Gram
# form; 20/(9, 10) and 20/(10, 10) straddle the switch.
LINEAR_SHAPES = [(40, 3, 5), (20, 9, 10), (20, 10, 10), (12, 20, 30), (6, 1, 1)]


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "d1", "d2"), LINEAR_SHAPES)
def test_linear_cka_matches_naive(n, d1, d2, debiased):
    x, y = make_pair(n, d1, d2, seed=n + d1 + d2)
    got = linear_cka(x, y, debiased=debiased)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, naive_linear_cka(x, y, debiased), rtol=RTOL64)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_naive(threshold, debiased):
    x, y = make_pair(15, 4, 7, seed=3)
    got = rbf_cka(x, y, threshold=threshold, debiased=debiased)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, naive_rbf_cka(x, y, threshold, debiased), rtol=RTOL64)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_host_path_computes_in_float64(fn):
    x, y = make_pair(16, 3, 4, seed=1)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    ref = fn(x32.astype(np.float64), y32.astype(np.float64))
    np.testing.assert_allclose(fn(x32, y32), ref, rtol=RTOL64)
    # Concrete jax arrays take the host path too.
    got = fn(jnp.asarray(x32), jnp.asarray(y32))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, ref, rtol=RTOL64)


def test_integer_features_accepted():
    x = np.arange(24).reshape(8, 3) % 5
    y = (np.arange(16).reshape(8, 2) * 7) % 3
    np.testing.assert_allclose(
        linear_cka(x, y), naive_linear_cka(x.astype(float), y.astype(float)), rtol=RTOL64
    )


# --------------------------------------------------------------------------------------
# Under jax.jit: 0-d arrays of the input dtype, same values at float32 tolerance.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fn", "ref", "shape"),
    [
        ("linear/feature", linear_cka, naive_linear_cka, (30, 3, 5)),
        ("linear/gram", linear_cka, naive_linear_cka, (10, 8, 6)),
        (
            "linear/debiased",
            functools.partial(linear_cka, debiased=True),
            functools.partial(naive_linear_cka, debiased=True),
            (30, 3, 5),
        ),
        (
            "linear/debiased-gram",
            functools.partial(linear_cka, debiased=True),
            functools.partial(naive_linear_cka, debiased=True),
            (10, 8, 6),
        ),
        (
            "rbf",
            functools.partial(rbf_cka, threshold=0.7),
            functools.partial(naive_rbf_cka, threshold=0.7),
            (12, 3, 4),
        ),
        (
            "rbf/debiased",
            functools.partial(rbf_cka, debiased=True),
            functools.partial(naive_rbf_cka, debiased=True),
            (12, 3, 4),
        ),
    ],
)
def test_jit_matches_naive(name, fn, ref, shape):
    x, y = make_pair(*shape, seed=7)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    got = jax.jit(fn)(x32, y32)
    assert got.shape == ()
    assert got.dtype == jnp.float32
    expected = ref(x32.astype(np.float64), y32.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL32, atol=ATOL32, err_msg=name)


def test_jit_static_keyword_and_half_precision():
    x, y = make_pair(20, 4, 4, seed=2)
    jitted = jax.jit(linear_cka, static_argnames="debiased")
    got = jitted(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), debiased=True)
    # Half-precision inputs are computed in float32 (documented policy).
    assert got.shape == ()
    assert got.dtype == jnp.float32


def test_jit_constant_input_gives_nan_as_documented():
    # Tracers cannot raise on values: the documented traced-path result is NaN, not a number.
    _, y = make_pair(10, 3, 4)
    got = jax.jit(linear_cka)(np.ones((10, 3), np.float32), y.astype(np.float32))
    assert np.isnan(np.asarray(got))


# --------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(6, 24), st.integers(1, 10), st.integers(1, 10))
seeds = st.integers(0, 2**32 - 1)
scales = st.floats(1e-3, 1e3)
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


@PROPERTY_SETTINGS
@given(shape=shapes, seed=seeds, debiased=st.booleans())
def test_self_similarity_is_one(shape, seed, debiased):
    n, d1, _ = shape
    x, _ = make_pair(n, d1, 1, seed=seed)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, rel=1e-12)
    assert rbf_cka(x, x, debiased=debiased) == pytest.approx(1.0, rel=1e-12)


@PROPERTY_SETTINGS
@given(shape=shapes, seed=seeds, scale_x=scales, scale_y=scales, debiased=st.booleans())
def test_orthogonal_and_isotropic_scaling_invariance(shape, seed, scale_x, scale_y, debiased):
    n, d1, d2 = shape
    x, y = make_pair(n, d1, d2, seed=seed)
    qx, qy = random_orthogonal(d1, seed), random_orthogonal(d2, seed + 1)
    xt, yt = scale_x * x @ qx, scale_y * y @ qy
    for fn in (linear_cka, rbf_cka):
        base = fn(x, y, debiased=debiased)
        np.testing.assert_allclose(fn(xt, y, debiased=debiased), base, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(fn(x, yt, debiased=debiased), base, rtol=1e-8, atol=1e-12)


@PROPERTY_SETTINGS
@given(shape=shapes, seed=seeds, debiased=st.booleans())
def test_symmetric(shape, seed, debiased):
    x, y = make_pair(*shape, seed=seed)
    for fn in (linear_cka, rbf_cka):
        assert fn(x, y, debiased=debiased) == pytest.approx(
            fn(y, x, debiased=debiased), rel=1e-12, abs=1e-15
        )


@PROPERTY_SETTINGS
@given(shape=shapes, seed=seeds, noise=st.floats(0.0, 10.0))
def test_biased_linear_in_unit_interval(shape, seed, noise):
    x, y = make_pair(*shape, seed=seed, noise=noise)
    assert 0.0 <= linear_cka(x, y) <= 1.0
    assert -1.0 <= linear_cka(x, y, debiased=True) <= 1.0


def test_translation_invariance_large_offset():
    x, y = make_pair(30, 4, 5, seed=11)
    np.testing.assert_allclose(linear_cka(x + 1e4, y - 1e4), linear_cka(x, y), rtol=1e-8)


# --------------------------------------------------------------------------------------
# Minibatch CKA.
# --------------------------------------------------------------------------------------


def _batch_states(x, y, size):
    return [
        MinibatchCKA.from_features(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)
    ]


def test_minibatch_merge_order_free():
    x, y = make_pair(40, 5, 3, seed=4)
    states = _batch_states(x, y, 10)
    one_pass = MinibatchCKA.empty()
    for i in range(0, 40, 10):
        one_pass = one_pass.update(x[i : i + 10], y[i : i + 10])
    for order in itertools.permutations(range(4)):
        merged = MinibatchCKA.empty()
        for i in order:
            merged = merged.merge(states[i])
        assert merged.num_batches == 4
        assert merged.num_rows == 40
        assert merged.compute() == pytest.approx(one_pass.compute(), rel=1e-12)
    # Tree-shaped merge (as across hosts) and merging with the identity.
    tree = states[0].merge(states[1]).merge(states[2].merge(states[3]))
    assert tree.merge(MinibatchCKA.empty()).compute() == pytest.approx(
        one_pass.compute(), rel=1e-12
    )
    assert one_pass.compute() == pytest.approx(minibatch_cka(x, y, batch_size=10), rel=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), [(25, 3, 4), (9, 12, 5)])
def test_minibatch_single_batch_equals_naive_debiased(n, d1, d2):
    x, y = make_pair(n, d1, d2, seed=5)
    expected = naive_linear_cka(x, y, debiased=True)
    np.testing.assert_allclose(minibatch_cka(x, y, batch_size=n), expected, rtol=RTOL64)
    np.testing.assert_allclose(MinibatchCKA.from_features(x, y).compute(), expected, rtol=RTOL64)
    np.testing.assert_allclose(linear_cka(x, y, debiased=True), expected, rtol=RTOL64)


def test_minibatch_hsic_values_are_song_estimator():
    x, y = make_pair(11, 3, 2, seed=6)
    state = MinibatchCKA.from_features(x, y)
    kx, ky = naive_linear_gram(x), naive_linear_gram(y)
    np.testing.assert_allclose(state.hsic_xy, naive_hsic_unbiased(kx, ky), rtol=RTOL64)
    np.testing.assert_allclose(state.hsic_xx, naive_hsic_unbiased(kx, kx), rtol=RTOL64)
    np.testing.assert_allclose(state.hsic_yy, naive_hsic_unbiased(ky, ky), rtol=RTOL64)


def test_minibatch_close_to_full_debiased():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3000, 16)) * np.linspace(0.2, 2.0, 16)
    y = x @ rng.normal(size=(16, 12)) + 2.0 * rng.normal(size=(3000, 12))
    full = linear_cka(x, y, debiased=True)
    mb = minibatch_cka(x, y, batch_size=256)
    assert 0.5 < full < 0.9  # a non-trivial similarity, not 0 or 1
    # Both are consistent estimators of the same population CKA; observed gap ~1e-3.
    assert abs(mb - full) < 0.01


def test_minibatch_short_last_batch_is_merged_not_dropped():
    x, y = make_pair(22, 3, 3, seed=9)  # 22 = 4 * 5 + 2: the last 2 rows join batch 4.
    expected = MinibatchCKA.empty()
    for s in (slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 22)):
        expected = expected.update(x[s], y[s])
    assert expected.num_rows == 22
    assert minibatch_cka(x, y, batch_size=5) == pytest.approx(expected.compute(), rel=1e-12)
    # A last batch of >= 4 rows stays on its own: 24 = 5 * 4 + 4.
    x, y = make_pair(24, 3, 3, seed=9)
    expected = MinibatchCKA.empty()
    for i in range(0, 24, 5):
        expected = expected.update(x[i : i + 5], y[i : i + 5])
    assert expected.num_batches == 5
    assert minibatch_cka(x, y, batch_size=5) == pytest.approx(expected.compute(), rel=1e-12)


@pytest.mark.parametrize("n", [40, 42, 44])  # even split, merged short tail, own tail
def test_minibatch_jit_matches_host(n):
    x, y = make_pair(n, 5, 7, seed=10)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    got = jax.jit(functools.partial(minibatch_cka, batch_size=8))(x32, y32)
    assert got.shape == ()
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got), minibatch_cka(x32, y32, batch_size=8), rtol=RTOL32, atol=ATOL32
    )


def test_minibatch_state_is_immutable():
    x, y = make_pair(8, 2, 2, seed=0)
    empty = MinibatchCKA.empty()
    state = empty.update(x, y)
    assert empty.num_batches == 0
    assert state.num_batches == 1
    with pytest.raises(AttributeError):
        state.hsic_xy = 0.0  # type: ignore[misc]


def test_minibatch_errors():
    x, y = make_pair(12, 3, 4, seed=0)
    with pytest.raises(ValueError, match="no batches"):
        MinibatchCKA.empty().compute()
    with pytest.raises(ValueError, match="at least 4 rows"):
        MinibatchCKA.empty().update(x[:3], y[:3])
    with pytest.raises(ValueError, match=r"x_batch.shape\[0\] == 8 while y_batch.shape\[0\] == 6"):
        MinibatchCKA.empty().update(x[:8], y[:6])
    state = MinibatchCKA.from_features(x[:6], y[:6])
    with pytest.raises(ValueError, match="x has 2 features in this batch but 3"):
        state.update(x[6:, :2], y[6:])
    with pytest.raises(ValueError, match="y has 3 features in the merged state but 4"):
        state.merge(MinibatchCKA.from_features(x[6:], y[6:, :3]))
    with pytest.raises(ValueError, match="batch_size must be >= 4"):
        minibatch_cka(x, y, batch_size=3)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        minibatch_cka(x, y, batch_size=4.0)
    with pytest.raises(ValueError, match="at least 4 rows"):
        minibatch_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="x is constant"):
        minibatch_cka(np.ones((12, 3)), y, batch_size=4)
    with pytest.raises(TypeError, match="host-side"):
        jax.jit(lambda a, b: MinibatchCKA.empty().update(a, b).hsic_xy)(x, y)


# --------------------------------------------------------------------------------------
# cka_matrix.
# --------------------------------------------------------------------------------------


def _layers(n=14, seed=0):
    rng = np.random.default_rng(seed)
    stem = rng.normal(size=(n, 3, 2, 2))
    stage1 = np.maximum(stem.reshape(n, -1) @ rng.normal(size=(12, 9)), 0)
    logits = stage1 @ rng.normal(size=(9, 4)) + 0.3 * rng.normal(size=(n, 4))
    return {"stem": stem, "stage1": stage1, "logits": logits}


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matrix_matches_pairwise(kernel, debiased):
    a = _layers(seed=0)
    b = {k: v + 0.5 * np.random.default_rng(1).normal(size=v.shape) for k, v in a.items()}
    del b["stage1"]
    m = cka_matrix(a, b, kernel=kernel, threshold=0.8, debiased=debiased)
    assert isinstance(m, CKAMatrix)
    assert m.rows == ("stem", "stage1", "logits")
    assert m.cols == ("stem", "logits")
    assert m.values.shape == (3, 2)
    assert m.values.dtype == np.float64
    for (i, ka), (j, kb) in itertools.product(enumerate(m.rows), enumerate(m.cols)):
        x, y = a[ka].reshape(14, -1), b[kb].reshape(14, -1)
        if kernel == "linear":
            expected = linear_cka(x, y, debiased=debiased)
        else:
            expected = rbf_cka(x, y, threshold=0.8, debiased=debiased)
        np.testing.assert_allclose(m.values[i, j], expected, rtol=RTOL64, err_msg=f"{ka}/{kb}")


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matrix_diagonal_is_one(kernel):
    a = _layers()
    for b in (a, dict(a)):  # the same object (Grams reused) and an equal copy
        m = cka_matrix(a, b, kernel=kernel)
        np.testing.assert_allclose(np.diag(m.values), 1.0, rtol=1e-12)
        np.testing.assert_allclose(m.values, m.values.T, rtol=1e-12)
    with pytest.raises(ValueError, match="read-only"):
        m.values[0, 0] = 0.0


def test_cka_matrix_flattens_conv_maps():
    a = _layers()
    m = cka_matrix({"stem": a["stem"]}, {"logits": a["logits"]})
    expected = naive_linear_cka(a["stem"].reshape(14, 12), a["logits"])
    np.testing.assert_allclose(m.values[0, 0], expected, rtol=RTOL64)


def test_cka_matrix_jit():
    a = {k: v.astype(np.float32) for k, v in _layers().items()}
    m = jax.jit(functools.partial(cka_matrix, debiased=True))(a, a)
    assert isinstance(m, CKAMatrix)
    # jit flattens dicts with sorted keys, so the layers come back in sorted order.
    assert m.rows == m.cols == ("logits", "stage1", "stem")
    assert m.values.shape == (3, 3)
    assert m.values.dtype == jnp.float32
    ordered = {k: a[k] for k in m.rows}
    host = cka_matrix(ordered, ordered, debiased=True)
    np.testing.assert_allclose(np.asarray(m.values), host.values, rtol=RTOL32, atol=ATOL32)


def test_cka_matrix_errors():
    a = _layers()
    with pytest.raises(ValueError, match="features_a is empty"):
        cka_matrix({}, a)
    with pytest.raises(ValueError, match="features_b is empty"):
        cka_matrix(a, {})
    with pytest.raises(ValueError, match="kernel must be one of"):
        cka_matrix(a, a, kernel="cosine")
    with pytest.raises(TypeError, match="mapping"):
        cka_matrix([a["stem"]], a)
    with pytest.raises(
        ValueError,
        match=r"features_a\['stem'\].shape\[0\] == 14 while "
        r"features_b\['x'\].shape\[0\] == 13.*same inputs",
    ):
        cka_matrix(a, {"x": np.ones((13, 2))})
    with pytest.raises(ValueError, match=r"features_b\['v'\] must have shape \[n, ...\]"):
        cka_matrix(a, {"v": np.ones(14)})
    with pytest.raises(ValueError, match=r"features_b\['dead'\] is constant"):
        cka_matrix(a, {"dead": np.zeros((14, 3, 3))})
    with pytest.raises(ValueError, match=r"features_b\['bad'\] has 1 row\(s\) with NaN"):
        cka_matrix(a, {"bad": np.where(np.arange(14)[:, None] == 3, np.nan, 1.0) + a["logits"]})
    with pytest.raises(ValueError, match="at least 4 rows"):
        cka_matrix({"x": a["logits"][:3]}, {"y": a["logits"][:3]}, debiased=True)


# --------------------------------------------------------------------------------------
# Input errors of the pairwise functions.
# --------------------------------------------------------------------------------------

PAIRWISE = [
    linear_cka,
    functools.partial(linear_cka, debiased=True),
    rbf_cka,
    functools.partial(rbf_cka, debiased=True),
]


@pytest.mark.parametrize("fn", PAIRWISE)
def test_different_row_counts(fn):
    x, y = make_pair(10, 3, 4)
    with pytest.raises(ValueError, match=r"\(10, 3\) and \(9, 4\).*same inputs"):
        fn(x, y[:9])


@pytest.mark.parametrize("fn", PAIRWISE)
def test_wrong_ndim(fn):
    x, y = make_pair(10, 3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[n, d\], got shape \(10,\)"):
        fn(x[:, 0], y)
    with pytest.raises(ValueError, match=r"y must have shape \[n, d\], got shape \(10, 4, 1\)"):
        fn(x, y[..., None])


@pytest.mark.parametrize("fn", PAIRWISE)
def test_nan_rows_counted(fn):
    x, y = make_pair(10, 3, 4)
    y[[2, 5], 1] = np.nan
    y[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"y has 2 row\(s\) with NaN or inf"):
        fn(x, y)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_debiased_needs_four_rows(fn):
    x, y = make_pair(3, 2, 2)
    assert np.isfinite(fn(x, y))  # biased is fine with n = 3
    with pytest.raises(ValueError, match=r"debiased=True needs at least 4 rows.*\(3, 2\)"):
        fn(x, y, debiased=True)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fn(x[:1], y[:1])


@pytest.mark.parametrize("fn", PAIRWISE)
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7e5])
def test_constant_representation_raises(fn, value):
    x, y = make_pair(10, 3, 4)
    with pytest.raises(ValueError, match=r"x is constant .*undefined"):
        fn(np.full_like(x, value), y)
    with pytest.raises(ValueError, match=r"y is constant .*undefined"):
        fn(x, np.full((10, 7), value))


def test_constant_columns_are_ignored_exactly():
    # Dead units (constant columns) carry no signal: CKA equals CKA without them.
    x, y = make_pair(12, 3, 4, seed=2)
    x_dead = np.concatenate([x, np.full((12, 2), 0.1)], axis=1)
    for debiased in (False, True):
        assert linear_cka(x_dead, y, debiased=debiased) == pytest.approx(
            linear_cka(x, y, debiased=debiased), rel=1e-12
        )


def test_rbf_errors():
    x, y = make_pair(10, 3, 4)
    with pytest.raises(ValueError, match="median squared distance between rows of x is 0"):
        rbf_cka(np.concatenate([np.zeros((8, 3)), np.ones((2, 3))]), y)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
            rbf_cka(x, y, threshold=bad)
