"""featsim.train.losses against float64 NumPy references and scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import expit, log_softmax
from sklearn.metrics import log_loss
from sklearn.utils.class_weight import compute_class_weight

from featsim.train.losses import (
    CLASS_WEIGHT_MODES,
    class_weights,
    masked_mean,
    weighted_bce,
    weighted_softmax_ce,
)

# float32 losses against float64 references: a few ulps of float32 on O(1) values.
RTOL32 = 1e-5


def _bce_ref(logits, labels, w, mask=None):
    """Float64 NumPy reference: sum(w[y] m l) / sum(m), l = softplus(z) - y z."""
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64)
    m = np.ones_like(z) if mask is None else np.asarray(mask, np.float64)
    per = np.logaddexp(0.0, z) - y * z
    wy = np.asarray(w, np.float64)[y.astype(int)]
    return np.sum(wy * m * per) / np.sum(m)


def _softmax_ce_ref(logits, labels, w, mask=None):
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    m = np.ones(len(y)) if mask is None else np.asarray(mask, np.float64)
    per = -log_softmax(z, axis=1)[np.arange(len(y)), y]
    wy = np.asarray(w, np.float64)[y]
    return np.sum(wy * m * per) / np.sum(m)


def _binary_batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.7).astype(np.int32)
    logits = rng.normal(0.0, 2.0, n).astype(np.float32)
    mask = (rng.random(n) < 0.8).astype(np.float32)
    return logits, labels, mask


def _multiclass_batch(n=64, c=4, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n).astype(np.int32)
    logits = rng.normal(0.0, 2.0, (n, c)).astype(np.float32)
    mask = (rng.random(n) < 0.8).astype(np.float32)
    return logits, labels, mask


# ------------------------------------------------------------------------------------------
# class_weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [2, 4])
def test_class_weights_balanced_matches_sklearn(c):
    rng = np.random.default_rng(c)
    labels = rng.choice(c, size=500, p=np.linspace(1, 3, c) / np.linspace(1, 3, c).sum())
    w = class_weights(labels, c)
    ref = compute_class_weight("balanced", classes=np.arange(c), y=labels)
    assert w.dtype == np.float32 and w.shape == (c,)
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    # Each class carries the same total weight n / C.
    np.testing.assert_allclose(w * np.bincount(labels, minlength=c), 500 / c, rtol=1e-6)


def test_class_weights_gu_lee_training_set():
    labels = np.array([0] * 1341 + [1] * 3875)  # normal, pneumonia (Gu & Lee, Table 1)
    np.testing.assert_allclose(
        class_weights(jnp.asarray(labels), 2), [5216 / (2 * 1341), 5216 / (2 * 3875)], rtol=1e-6
    )


def test_class_weights_none_mode_and_errors():
    assert class_weights([0, 1, 1], 3, mode="none").tolist() == [1.0, 1.0, 1.0]
    assert "balanced" in CLASS_WEIGHT_MODES
    with pytest.raises(ValueError, match=r"class 2 has no examples.*\[1, 2, 0\]"):
        class_weights([0, 1, 1], 3)
    with pytest.raises(ValueError, match=r"class \[1, 3\] has no examples"):
        class_weights([0, 2, 2], 4)
    with pytest.raises(ValueError, match="unknown mode 'sqrt'"):
        class_weights([0, 1], 2, mode="sqrt")
    with pytest.raises(ValueError, match=r"lie in \[0, 2\).*e.g. 5"):
        class_weights([0, 5], 2)
    with pytest.raises(ValueError, match="integer class indices"):
        class_weights([0.0, 0.5], 2)
    with pytest.raises(ValueError, match="num_classes"):
        class_weights([0, 1], 1)


# ------------------------------------------------------------------------------------------
# weighted_bce
# ------------------------------------------------------------------------------------------


def test_bce_matches_numpy_reference():
    logits, labels, mask = _binary_batch()
    w = class_weights(labels, 2)
    out = weighted_bce(logits, labels, w, mask)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _bce_ref(logits, labels, w, mask), rtol=RTOL32)
    np.testing.assert_allclose(
        weighted_bce(logits, labels, w), _bce_ref(logits, labels, w), rtol=RTOL32
    )
    # [n, 1] logits (a Dense(1) head) give the same value.
    np.testing.assert_allclose(weighted_bce(logits[:, None], labels, w, mask), out, rtol=0)


def test_bce_matches_sklearn_log_loss():
    logits, labels, _ = _binary_batch(seed=2)
    w = class_weights(labels, 2)
    sample_w = w[labels].astype(np.float64)
    probs = expit(logits.astype(np.float64))
    # log_loss divides by sum(sample_weight); our normaliser is n (Keras class_weight).
    ref = log_loss(labels, probs, sample_weight=sample_w) * sample_w.sum() / len(labels)
    np.testing.assert_allclose(weighted_bce(logits, labels, w), ref, rtol=RTOL32)


def test_bce_unweighted_is_optax_mean():
    logits, labels, _ = _binary_batch(seed=3)
    ref = optax.sigmoid_binary_cross_entropy(logits, labels.astype(np.float32)).mean()
    np.testing.assert_allclose(weighted_bce(logits, labels), ref, rtol=RTOL32)
    np.testing.assert_allclose(weighted_bce(logits, labels, np.ones(2)), ref, rtol=RTOL32)


def test_bce_extreme_logits_finite():
    logits = np.array([100.0, -100.0, 100.0, -100.0], np.float32)
    labels = np.array([1, 0, 0, 1])
    w = np.array([2.0, 0.5], np.float32)
    out = weighted_bce(logits, labels, w)
    # Right with |z| = 100: loss ~ e^-100; wrong: loss 100. (2 * 100 + 0.5 * 100) / 4.
    assert np.isfinite(out)
    np.testing.assert_allclose(out, _bce_ref(logits, labels, w), rtol=RTOL32)
    np.testing.assert_allclose(out, 62.5, rtol=RTOL32)
    g = jax.grad(weighted_bce)(jnp.asarray(logits), labels, w)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, [0.0, 0.0, 2.0 / 4, -0.5 / 4], atol=1e-7)


def test_bce_masked_examples_have_zero_gradient():
    logits, labels, mask = _binary_batch(seed=4)
    padded = mask == 0
    labels = np.where(padded, -1, labels)  # padding labels need not be valid
    logits = np.where(padded, 100.0, logits).astype(np.float32)
    w = np.array([1.5, 0.7], np.float32)
    loss, g = jax.value_and_grad(weighted_bce)(jnp.asarray(logits), labels, w, mask)
    assert np.isfinite(loss)
    assert np.all(np.asarray(g)[padded] == 0.0)
    assert np.all(np.asarray(g)[~padded] != 0.0)
    keep = ~padded
    np.testing.assert_allclose(loss, _bce_ref(logits[keep], labels[keep], w), rtol=RTOL32)


def test_bce_jit_and_dtypes():
    logits, labels, mask = _binary_batch(seed=5)
    w = class_weights(labels, 2)
    eager = weighted_bce(logits, labels, w, mask)
    jitted = jax.jit(weighted_bce)(logits, labels, w, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    assert jitted.shape == () and jitted.dtype == jnp.float32
    # bfloat16 logits are promoted: the loss is float32.
    assert weighted_bce(jnp.asarray(logits, jnp.bfloat16), labels, w).dtype == jnp.float32
    # Float labels {0., 1.} as produced by a data pipeline work too.
    np.testing.assert_allclose(weighted_bce(logits, labels.astype(np.float32), w, mask), eager)


def test_bce_invalid_unmasked_label_is_nan_and_bad_shapes_raise():
    assert np.isnan(weighted_bce(np.zeros(2, np.float32), np.array([0, 2])))
    assert np.isnan(weighted_bce(np.zeros(2, np.float32), np.array([0.0, 0.5])))
    with pytest.raises(ValueError, match=r"labels.shape == \(3,\) while logits give n == 2"):
        weighted_bce(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"\[n\] or \[n, 1\]"):
        weighted_bce(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"class_weights must have shape \[2\]"):
        weighted_bce(np.zeros(2), np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match="mask must have shape"):
        weighted_bce(np.zeros(2), np.zeros(2), None, np.ones(3))


def test_bce_all_masked_is_zero():
    z = jnp.array([1.0, -2.0])
    loss, g = jax.value_and_grad(weighted_bce)(z, jnp.array([0, 1]), None, jnp.zeros(2))
    assert loss == 0.0 and np.all(np.asarray(g) == 0.0)


# ------------------------------------------------------------------------------------------
# weighted_softmax_ce
# ------------------------------------------------------------------------------------------


def test_softmax_ce_matches_numpy_reference():
    logits, labels, mask = _multiclass_batch()
    w = class_weights(labels, 4)
    out = weighted_softmax_ce(logits, labels, w, mask)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _softmax_ce_ref(logits, labels, w, mask), rtol=RTOL32)


def test_softmax_ce_matches_sklearn_log_loss():
    logits, labels, _ = _multiclass_batch(seed=2)
    w = class_weights(labels, 4)
    sample_w = w[labels].astype(np.float64)
    probs = np.exp(log_softmax(logits.astype(np.float64), axis=1))
    ref = log_loss(labels, probs, sample_weight=sample_w, labels=range(4))
    ref *= sample_w.sum() / len(labels)  # log_loss divides by sum(sample_weight), we by n
    np.testing.assert_allclose(weighted_softmax_ce(logits, labels, w), ref, rtol=RTOL32)


def test_softmax_ce_unweighted_is_optax_mean():
    logits, labels, _ = _multiclass_batch(seed=3)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(weighted_softmax_ce(logits, labels), ref, rtol=RTOL32)


def test_softmax_ce_binary_equals_bce():
    """Two-class softmax on logits [0, z] is the sigmoid BCE on z."""
    logits, labels, mask = _binary_batch(seed=6)
    w = np.array([1.9, 0.7], np.float32)
    two = np.stack([np.zeros_like(logits), logits], axis=1)
    np.testing.assert_allclose(
        weighted_softmax_ce(two, labels, w, mask),
        weighted_bce(logits, labels, w, mask),
        rtol=RTOL32,
    )


def test_softmax_ce_extreme_logits_and_masked_gradient():
    rng = np.random.default_rng(7)
    n, c = 16, 4
    logits = (100.0 * rng.choice([-1.0, 1.0], (n, c))).astype(np.float32)
    labels = rng.integers(0, c, n)
    mask = np.ones(n, np.float32)
    mask[::3] = 0.0
    labels[::3] = -1  # padding
    w = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    loss, g = jax.value_and_grad(weighted_softmax_ce)(jnp.asarray(logits), labels, w, mask)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    keep = mask == 1
    np.testing.assert_allclose(loss, _softmax_ce_ref(logits[keep], labels[keep], w), rtol=RTOL32)
    assert np.all(np.asarray(g)[~keep] == 0.0)


def test_softmax_ce_jit_and_errors():
    logits, labels, mask = _multiclass_batch(seed=8)
    w = class_weights(labels, 4)
    eager = weighted_softmax_ce(logits, labels, w, mask)
    jitted = jax.jit(weighted_softmax_ce)(logits, labels, w, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    assert jitted.dtype == jnp.float32
    assert np.isnan(weighted_softmax_ce(np.zeros((2, 3), np.float32), np.array([0, 3])))
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        weighted_softmax_ce(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match="integer class indices"):
        weighted_softmax_ce(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=r"class_weights must have shape \[3\]"):
        weighted_softmax_ce(np.zeros((2, 3)), np.zeros(2, int), np.ones(2))


# ------------------------------------------------------------------------------------------
# masked_mean
# ------------------------------------------------------------------------------------------


def test_masked_mean():
    x = np.array([1.0, 2.0, 3.0, np.nan], np.float32)
    m = np.array([1, 1, 1, 0])
    assert float(masked_mean(x, m)) == 2.0
    assert float(masked_mean(x, m.astype(bool))) == 2.0
    assert float(masked_mean(x[:3])) == 2.0
    assert float(masked_mean(x, np.zeros(4))) == 0.0
    # Fractional masks are weights of the mean.
    np.testing.assert_allclose(masked_mean(x[:3], [0.5, 1.0, 0.5]), 2.0, rtol=1e-7)
    # The mask broadcasts to x.shape by NumPy rules (here over the last axis).
    np.testing.assert_allclose(masked_mean(np.ones((2, 3)), np.array([1.0, 0.0, 1.0])), 1.0)
    g = jax.grad(masked_mean)(jnp.asarray(x), m)
    np.testing.assert_allclose(g, [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-7)
    assert g[3] == 0.0
    assert jax.jit(masked_mean)(x, m).dtype == jnp.float32
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_mean(np.ones(3), np.ones(4))


def test_weighted_example_losses_reduce_to_the_weighted_means():
    """The unreduced terms the training step sums are those of weighted_bce / _softmax_ce."""
    from featsim.train.losses import weighted_example_losses

    rng = np.random.default_rng(7)
    labels = jnp.asarray(rng.integers(0, 2, 9))
    logits = jnp.asarray(rng.normal(size=(9, 1)), jnp.float32)
    w = jnp.array([2.0, 0.5])
    terms = weighted_example_losses(logits, labels, w)
    assert terms.shape == (9,)
    np.testing.assert_allclose(terms.mean(), weighted_bce(logits, labels, w), rtol=1e-6)
    labels4 = jnp.asarray(rng.integers(0, 4, 9))
    logits4 = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    w4 = jnp.array([1.0, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(weighted_example_losses(logits4, labels4, w4).mean(),
                               weighted_softmax_ce(logits4, labels4, w4), rtol=1e-6)
