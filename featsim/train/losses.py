"""Class-weighted, maskable classification losses for train steps (JAX, jittable).

Gu & Lee (2024, Bioengineering 11:406, sec. 5.8) counter the class imbalance of the pneumonia
X-ray training set (1341 normal vs 3875 pneumonia) "by using class weights in the loss
function". :func:`class_weights` gives scikit-learn's ``"balanced"`` weights, and
:func:`weighted_bce` / :func:`weighted_softmax_ce` apply them per example.

Reduction convention (the same for both losses)::

    loss = sum_i w[y_i] * m_i * l_i / sum_i m_i

with ``l_i`` the unweighted cross-entropy of example ``i``, ``w`` the class weights and ``m``
the mask (1 for a real example, 0 for padding). The normaliser is the number of (unmasked)
examples, **not** the sum of their weights. This is how Keras applies ``class_weight`` (a
per-sample weight under the default ``"sum_over_batch_size"`` reduction) and how PyTorch's
``BCEWithLogitsLoss(weight=...)`` averages; it differs from PyTorch's
``CrossEntropyLoss(weight=...)`` and from ``sklearn.metrics.log_loss(sample_weight=...)``,
which divide by ``sum_i w[y_i]``. With balanced weights the two agree in expectation
(``sum_i w[y_i] = n`` on the training set) but not per batch, and ours keeps the loss scale,
and so the learning rate, independent of a batch's class mix. With ``class_weights=None``
(or all ones) the loss is the plain mean cross-entropy.

Numerics and padding:

* Cross-entropies come from ``jax.nn.log_sigmoid`` / ``jax.nn.log_softmax``, finite for any
  finite logits (|logits| = 100 included); the loss is computed in at least float32 (bfloat16
  or float16 logits are promoted).
* A masked example contributes exactly nothing: its value is replaced by 0 with
  ``jnp.where`` (so NaN/inf there cannot leak into the loss) and its gradient is exactly 0
  (provided its logits are finite). Padded rows may carry any label, e.g. -1.
* Labels cannot be checked inside ``jit``; an *unmasked* label outside ``[0, C)`` (or not 0/1
  for the binary loss) gets weight NaN, so the loss is NaN rather than silently wrong.
* A batch with no unmasked example has loss 0 and gradient 0.
* Under data parallelism, ``lax.pmean`` of per-device losses equals the global loss only
  when every device holds the same number of unmasked examples; otherwise combine
  ``sum(w m l)`` and ``sum(m)`` with ``lax.psum`` before dividing.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CLASS_WEIGHT_MODES",
    "class_weights",
    "masked_mean",
    "multitask_example_losses",
    "multitask_loss",
    "weighted_bce",
    "weighted_example_losses",
    "weighted_softmax_ce",
]


def _balanced(counts: np.ndarray) -> np.ndarray:
    return counts.sum() / (counts.size * counts)


def _uniform(counts: np.ndarray) -> np.ndarray:
    return np.ones(counts.size, dtype=np.float64)


_MODES = {"balanced": _balanced, "none": _uniform}
#: Valid ``mode`` values of :func:`class_weights`.
CLASS_WEIGHT_MODES = tuple(_MODES)


def class_weights(labels, num_classes: int, *, mode: str = "balanced") -> np.ndarray:
    """Per-class loss weights from the training labels.

    ``"balanced"``: ``w_c = n / (C * n_c)``, scikit-learn's
    ``compute_class_weight("balanced", ...)`` (after King & Zeng 2001, "Logistic Regression
    in Rare Events Data", Political Analysis 9:137): each class then carries the same total
    weight ``n / C``. ``"none"``: all ones (unweighted loss, same code path).

    Args:
      labels: integer array of shape ``[n]`` with values in ``[0, num_classes)``, the
        labels of the *training* set (host-side NumPy or JAX array).
      num_classes: ``C >= 2``.
      mode: one of :data:`CLASS_WEIGHT_MODES`.

    Returns:
      float32 NumPy array of shape ``[C]``.

    Raises:
      ValueError: unknown ``mode``, labels not integers in ``[0, C)``, or (``"balanced"``) a
        class without examples, which is named.

    Example:
      >>> class_weights([0] * 1341 + [1] * 3875, 2).round(4)  # Gu & Lee's training set
      array([1.9448, 0.673 ], dtype=float32)
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {CLASS_WEIGHT_MODES}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must have shape [n] with n >= 1, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(y == np.round(y)):
            raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    out = (y < 0) | (y >= num_classes)
    if out.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got {int(out.sum())} outside, e.g. "
            f"{int(y[np.flatnonzero(out)[0]])}"
        )
    counts = np.bincount(y, minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty and mode == "balanced":
        raise ValueError(
            f"class {empty[0] if len(empty) == 1 else empty} has no examples among the "
            f"{y.size} labels (counts per class {counts.tolist()}); balanced weights "
            "n / (C * n_c) are undefined"
        )
    return _MODES[mode](counts.astype(np.float64)).astype(np.float32)


def masked_mean(x, mask=None):
    """``sum(x * mask) / sum(mask)``, 0 when ``sum(mask) == 0``; jittable.

    Masked entries (``mask == 0``) are replaced by 0 before the sum, so a NaN/inf there does
    not reach the result, and their gradient is 0.

    Args:
      x: float array of any shape.
      mask: None (plain mean) or a bool/float array broadcastable to ``x.shape``; entries
        are weights of the mean (normally 0/1). The normaliser is the sum of the broadcast
        mask.

    Returns:
      0-d float array (at least float32).

    Example:
      >>> float(masked_mean(jnp.array([1.0, 2.0, jnp.nan]), jnp.array([1, 1, 0])))
      1.5
    """
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    if mask is None:
        return jnp.mean(x)
    mask = jnp.asarray(mask)
    try:
        mask = jnp.broadcast_to(mask, x.shape)
    except ValueError as err:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to x.shape == {x.shape}"
        ) from err
    return _masked_mean(x, mask.astype(dtype))


def _masked_mean(x, mask):
    keep = mask != 0
    total = jnp.sum(jnp.where(keep, x * jnp.where(keep, mask, 0), 0))
    count = jnp.sum(mask)
    return jnp.where(count != 0, total / jnp.where(count != 0, count, 1), 0).astype(x.dtype)


def _check_mask(mask, n: int, dtype):
    if mask is None:
        return jnp.ones((n,), dtype)
    mask = jnp.asarray(mask)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [n] == ({n},), got {mask.shape}")
    return mask.astype(dtype)


def _check_weights(class_weights, c: int, dtype):
    if class_weights is None:
        return jnp.ones((c,), dtype)
    w = jnp.asarray(class_weights)
    if w.shape != (c,):
        raise ValueError(f"class_weights must have shape [{c}], got {w.shape}")
    return w.astype(dtype)


def _reduce(per_example, weight, mask):
    """``sum(w * m * l) / sum(m)`` with masked rows replaced by 0 (value and gradient)."""
    keep = mask != 0
    safe_w = jnp.where(keep, weight, 0)  # a NaN weight of a padded row must not reach grads
    safe_l = jnp.where(keep, per_example, 0)
    return _masked_mean(safe_w * safe_l, mask)


def weighted_bce(logits, labels, class_weights=None, mask=None):
    """Class-weighted binary cross-entropy of a sigmoid head; jittable.

    ``l_i = -y_i log sigmoid(z_i) - (1 - y_i) log sigmoid(-z_i)`` (as
    ``optax.sigmoid_binary_cross_entropy``), reduced as ``sum(w[y] m l) / sum(m)`` (see the
    module docstring for why the normaliser is ``sum(m)``, Keras' ``class_weight``
    convention).

    Args:
      logits: float array of shape ``[n]`` or ``[n, 1]``, the pre-sigmoid output for class 1.
      labels: array of shape ``[n]`` with values 0 or 1 (int, bool or float).
      class_weights: float array of shape ``[2]`` (e.g. from :func:`class_weights`), or None
        for unweighted.
      mask: None or array of shape ``[n]``; 0 marks padding.

    Returns:
      0-d float array (float32 unless the logits are float64).

    Raises:
      ValueError: inconsistent shapes (checked at trace time).

    Example:
      >>> float(weighted_bce(jnp.array([0.0, 0.0]), jnp.array([0, 1]), jnp.array([3.0, 1.0])))
      1.3862943649291992
    """
    logits = jnp.asarray(logits)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(
            f"logits must have shape [n] or [n, 1] (one sigmoid output), got {logits.shape}"
        )
    n = logits.shape[0]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    labels = jnp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels.shape == {labels.shape} while logits give n == {n}")
    w = _check_weights(class_weights, 2, dtype)
    mask = _check_mask(mask, n, dtype)
    return _weighted_bce(logits, labels, w, mask)


def _bce_terms(logits, labels, w):
    """Per-example BCE ``l`` and weight ``w[y]`` (NaN for a label that is not 0 or 1)."""
    y = labels.astype(logits.dtype)
    per_example = -y * jax.nn.log_sigmoid(logits) - (1 - y) * jax.nn.log_sigmoid(-logits)
    valid = (y == 0) | (y == 1)
    return per_example, jnp.where(valid, w[jnp.where(y == 1, 1, 0)], jnp.nan)


@jax.jit
def _weighted_bce(logits, labels, w, mask):
    return _reduce(*_bce_terms(logits, labels, w), mask)


def weighted_softmax_ce(logits, labels, class_weights=None, mask=None):
    """Class-weighted softmax cross-entropy with integer labels; jittable.

    ``l_i = -log softmax(z_i)[y_i]`` (as ``optax.softmax_cross_entropy_with_integer_labels``),
    reduced as ``sum(w[y] m l) / sum(m)``, the convention of :func:`weighted_bce`.

    Args:
      logits: float array of shape ``[n, C]``.
      labels: integer array of shape ``[n]`` with values in ``[0, C)``.
      class_weights: float array of shape ``[C]``, or None for unweighted.
      mask: None or array of shape ``[n]``; 0 marks padding.

    Returns:
      0-d float array (float32 unless the logits are float64).

    Raises:
      ValueError: inconsistent shapes (checked at trace time).

    Example:
      >>> float(weighted_softmax_ce(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log(4)
      1.3862943649291992
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [n, C], got {logits.shape}")
    n, c = logits.shape
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    labels = jnp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels.shape == {labels.shape} while logits.shape == {(n, c)}")
    if labels.dtype == jnp.bool_:
        labels = labels.astype(jnp.int32)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    w = _check_weights(class_weights, c, dtype)
    mask = _check_mask(mask, n, dtype)
    return _weighted_softmax_ce(logits, labels, w, mask)


def _softmax_ce_terms(logits, labels, w):
    """Per-example cross-entropy ``l`` and weight ``w[y]`` (NaN for a label outside [0, C))."""
    c = logits.shape[1]
    valid = (labels >= 0) & (labels < c)
    idx = jnp.clip(labels, 0, c - 1).astype(jnp.int32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    per_example = -jnp.take_along_axis(log_p, idx[:, None], axis=-1)[:, 0]
    return per_example, jnp.where(valid, w[idx], jnp.nan)


@jax.jit
def _weighted_softmax_ce(logits, labels, w, mask):
    return _reduce(*_softmax_ce_terms(logits, labels, w), mask)


def weighted_example_losses(logits, labels, class_weights):
    """Per-example ``w[y_i] * l_i`` ``[n]``, unreduced: BCE for one sigmoid output
    (``logits [n, 1]``), softmax cross-entropy for ``[n, C]``. The training step sums these
    over devices itself (the global normaliser of :mod:`featsim.train.steps`); the terms are
    those of :func:`weighted_bce` and :func:`weighted_softmax_ce`."""
    w = jnp.asarray(class_weights, jnp.promote_types(logits.dtype, jnp.float32))
    if logits.shape[-1] == 1:
        per_example, weight = _bce_terms(logits[:, 0], labels, w)
    else:
        per_example, weight = _softmax_ce_terms(logits, labels, w)
    return per_example * weight


def multitask_example_losses(logits, labels, preds, targets, class_weights, alpha):
    """Per-example ``(w[y_i] l_i + alpha * e_i, w[y_i] l_i, e_i)``, each ``[n]``, unreduced,
    with ``e_i = mean_j (preds_ij - targets_ij)^2``: the terms of :func:`multitask_loss` that
    the training step sums over devices itself (global normaliser)."""
    ce = weighted_example_losses(logits, labels, class_weights)
    dtype = jnp.promote_types(ce.dtype, jnp.promote_types(jnp.asarray(preds).dtype,
                                                          jnp.float32))
    err = jnp.mean(jnp.square(jnp.asarray(preds, dtype) - jnp.asarray(targets, dtype)),
                   axis=-1)
    return ce + alpha * err, ce, err


def multitask_loss(logits, labels, preds, targets, alpha, class_weights=None, mask=None):
    """Classification plus auxiliary regression: ``L_CE + alpha * L_MSE``; jittable.

    Park ("Cross-domain transfer learning for medical condition classification from infant
    X-ray images", eq. 2-4) trains an 11-class diagnosis with an age-regression head,
    ``L_total = L_CE + alpha * L_MSE`` with ``alpha = 0.8``. Here::

        L_CE  = sum_i w[y_i] m_i l_i / sum_i m_i       (weighted_softmax_ce / weighted_bce)
        L_MSE = sum_i m_i sum_j (p_ij - t_ij)^2 / (T * sum_i m_i)

    Class weights apply to the cross-entropy term only; every example's regression error
    counts the same. Masked (padding) rows contribute nothing to either term. With
    ``alpha == 0`` the result equals the plain classification loss exactly (for finite
    predictions and targets).

    Args:
      logits: float ``[n, C]`` (softmax) or ``[n, 1]`` / ``[n]`` (sigmoid).
      labels: int ``[n]``.
      preds: float ``[n, T]`` (or ``[n]`` for ``T = 1``), the auxiliary head's output.
      targets: float, the shape of ``preds``.
      alpha: weight of the regression term (>= 0).
      class_weights: float ``[C]`` (``[2]`` for sigmoid), or None.
      mask: None or ``[n]``; 0 marks padding.

    Returns:
      0-d float array.

    Raises:
      ValueError: inconsistent shapes (checked at trace time).

    Example:
      >>> float(multitask_loss(jnp.zeros((2, 4)), jnp.array([0, 3]), jnp.array([1.0, 2.0]),
      ...                      jnp.array([0.0, 0.0]), 0.5))  # log(4) + 0.5 * 2.5
      2.636294364929199
    """
    logits = jnp.asarray(logits)
    n = logits.shape[0]
    preds, targets = jnp.asarray(preds), jnp.asarray(targets)
    if preds.ndim == 1:
        preds = preds[:, None]
    if targets.ndim == 1:
        targets = targets[:, None]
    if preds.ndim != 2 or preds.shape[0] != n or targets.shape != preds.shape:
        raise ValueError(f"preds and targets must both have shape [n, T] with n == {n}; got "
                         f"preds {preds.shape}, targets {targets.shape}")
    if logits.ndim == 1 or logits.shape[-1] == 1:
        ce = weighted_bce(logits, labels, class_weights, mask)
    else:
        ce = weighted_softmax_ce(logits, labels, class_weights, mask)
    dtype = jnp.promote_types(ce.dtype, jnp.promote_types(preds.dtype, jnp.float32))
    err = jnp.mean(jnp.square(preds.astype(dtype) - targets.astype(dtype)), axis=-1)
    mse = masked_mean(err, _check_mask(mask, n, dtype))
    return ce + jnp.asarray(alpha, ce.dtype) * mse
