"""featsim.train.classification against scikit-learn and hand-computed references."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from featsim.train.classification import (
    BINARY_METRIC_KEYS,
    MULTICLASS_METRIC_KEYS,
    PROB_SUM_ATOL,
    RELIABILITY_KEYS,
    UndefinedMetricWarning,
    auc_ci,
    classification_metrics,
    reliability_diagram,
)


def _naive_ece(labels, probs, n_bins):
    """Guo et al. (2017) eq. 3 with an explicit loop over bins (lo, hi]."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = pred == np.asarray(labels)
    ece = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m else (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return ece


def _binary_data(n=300, seed=0, pos_rate=0.65):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < pos_rate).astype(np.int64)
    # Informative but imperfect scores, squashed into (0, 1).
    logits = 1.5 * (2 * labels - 1) + rng.normal(0.0, 1.5, n)
    return labels, 1.0 / (1.0 + np.exp(-logits))


def _multiclass_data(n=400, c=4, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), labels] += 1.2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return labels, probs / probs.sum(axis=1, keepdims=True)


def _quiet(fn, *args, **kwargs):
    """Calls fn, failing on any warning (defined metrics must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# Binary
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_binary_matches_sklearn(threshold):
    labels, p = _binary_data()
    m = _quiet(classification_metrics, labels, p, threshold=threshold)
    assert tuple(m) == BINARY_METRIC_KEYS
    pred = (p > threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert all(type(m[k]) is int for k in ("tp", "fp", "tn", "fn"))
    prec, rec, f1, _ = precision_recall_fscore_support(
        labels, pred, average="binary", zero_division=0
    )
    spec = recall_score(labels, pred, pos_label=0)
    np.testing.assert_allclose(m["accuracy"], accuracy_score(labels, pred), rtol=1e-12)
    np.testing.assert_allclose(m["precision"], prec, rtol=1e-12)
    np.testing.assert_allclose(m["recall"], rec, rtol=1e-12)
    np.testing.assert_allclose(m["specificity"], spec, rtol=1e-12)
    np.testing.assert_allclose(m["f1"], f1, rtol=1e-12)
    np.testing.assert_allclose(m["g_mean"], math.sqrt(rec * spec), rtol=1e-12)
    np.testing.assert_allclose(m["roc_auc"], roc_auc_score(labels, p), rtol=1e-12)
    np.testing.assert_allclose(m["ece"], _naive_ece(labels, p, 15), rtol=1e-12)
    micro = precision_recall_fscore_support(labels, pred, average="micro", zero_division=0)
    for key, want in zip(("precision_micro", "recall_micro", "f1_micro"), micro[:3],
                         strict=True):
        np.testing.assert_allclose(m[key], want, rtol=1e-12, err_msg=key)
    assert all(isinstance(v, float) for k, v in m.items() if k not in ("tp", "fp", "tn", "fn"))


def test_binary_input_shapes_agree():
    labels, p = _binary_data(seed=3)
    ref = classification_metrics(labels, p)
    two_col = classification_metrics(labels, np.stack([1 - p, p], axis=1), num_classes=2)
    one_col = classification_metrics(labels, p[:, None])
    assert two_col == pytest.approx(ref, rel=1e-12)
    assert one_col == ref


def test_jax_float32_inputs():
    labels, p = _binary_data(seed=4)
    p32 = jax.nn.sigmoid(jnp.asarray(np.log(p / (1 - p)), jnp.float32))  # a float32 head
    m = classification_metrics(jnp.asarray(labels, jnp.int32), p32, loss=jnp.float32(0.25))
    p_host = np.asarray(p32, np.float64)
    np.testing.assert_allclose(m["roc_auc"], roc_auc_score(labels, p_host), rtol=1e-12)
    assert m["loss"] == 0.25 and type(m["loss"]) is float
    assert tuple(m) == (*BINARY_METRIC_KEYS, "loss")


def test_float_and_bool_labels_accepted():
    labels, p = _binary_data(n=50, seed=5)
    ref = classification_metrics(labels, p)
    assert classification_metrics(labels.astype(np.float32), p) == ref
    assert classification_metrics(labels.astype(bool), p) == ref


def test_auc_ties_match_sklearn():
    labels, p = _binary_data(n=500, seed=6)
    coarse = np.round(p, 1)  # ~11 distinct scores: many ties inside and across classes
    m = classification_metrics(labels, coarse)
    np.testing.assert_allclose(m["roc_auc"], roc_auc_score(labels, coarse), rtol=1e-12)
    # All scores equal: every positive-negative pair is a tie, worth one half.
    assert classification_metrics([0, 1, 1, 0], [0.3] * 4)["roc_auc"] == 0.5
    # Hand example: pairs (pos, neg) = (0.8>0.4), (0.8>0.2), (0.4=0.4 -> 1/2), (0.4>0.2).
    assert classification_metrics([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.2])["roc_auc"] == 0.875


def test_binary_perfect_predictions():
    labels = np.array([0, 1, 1, 0, 1])
    m = _quiet(classification_metrics, labels, labels.astype(float))
    for k in ("accuracy", "precision", "recall", "specificity", "f1", "g_mean", "roc_auc"):
        assert m[k] == 1.0, k
    assert m["ece"] == 0.0
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 0, 2, 0)


def test_no_predicted_positives_is_zero_not_warning():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([0.1, 0.4, 0.3, 0.2])  # all below 0.5
    m = _quiet(classification_metrics, labels, probs)
    prec, rec, f1, _ = precision_recall_fscore_support(
        labels, np.zeros(4, int), average="binary", zero_division=0
    )
    assert m["precision"] == prec == 0.0
    assert m["recall"] == rec == 0.0
    assert m["f1"] == f1 == 0.0
    assert m["specificity"] == 1.0
    assert m["g_mean"] == 0.0
    assert m["roc_auc"] == 1.0  # the ranking is still perfect


def test_single_class_auc_is_nan_with_warning():
    labels = np.ones(6, int)
    probs = np.array([0.9, 0.2, 0.7, 0.6, 0.4, 0.8])
    with pytest.warns(UndefinedMetricWarning, match="only class 1 is present"):
        m = classification_metrics(labels, probs)
    assert math.isnan(m["roc_auc"])
    # Zero-division conventions for the absent negative class.
    assert m["specificity"] == 0.0 and m["g_mean"] == 0.0
    assert m["tn"] == m["fp"] == 0
    assert m["recall"] == pytest.approx(4 / 6) and m["precision"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = roc_auc_score(labels, probs)
        except ValueError:  # older scikit-learn raised instead of returning NaN
            ref = math.nan
    assert math.isnan(ref)
    with pytest.warns(UndefinedMetricWarning, match="only class 0 is present"):
        m0 = classification_metrics(np.zeros(3, int), [0.1, 0.2, 0.9])
    assert m0["recall"] == 0.0 and m0["precision"] == 0.0 and m0["f1"] == 0.0


def test_ece_hand_computed():
    # conf = max(p, 1-p) = [0.9, 0.8, 0.7, 0.6]; predicted [1, 1, 0, 1]; correct [T, F, T, T].
    # Bins of width 0.2: (0.4, 0.6] {0.6: T}, (0.6, 0.8] {0.8: F, 0.7: T}, (0.8, 1] {0.9: T}.
    # ECE = 1/4 |1 - 0.6| + 2/4 |0.5 - 0.75| + 1/4 |1 - 0.9| = 0.1 + 0.125 + 0.025 = 0.25.
    labels = [1, 0, 0, 1]
    probs = [0.9, 0.8, 0.3, 0.6]
    m = classification_metrics(labels, probs, n_bins=5)
    assert m["ece"] == pytest.approx(0.25, abs=1e-15)
    d = reliability_diagram(labels, probs, n_bins=5)
    assert tuple(d) == RELIABILITY_KEYS
    np.testing.assert_allclose(d["bin_edges"], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert d["count"].tolist() == [0, 0, 1, 2, 1]
    np.testing.assert_allclose(d["confidence"], [np.nan, np.nan, 0.6, 0.75, 0.9])
    np.testing.assert_allclose(d["accuracy"], [np.nan, np.nan, 1.0, 0.5, 1.0])
    assert d["ece"] == pytest.approx(0.25, abs=1e-15)
    # One bin: |mean accuracy - mean confidence| = |0.75 - 0.75| = 0.
    assert classification_metrics(labels, probs, n_bins=1)["ece"] == pytest.approx(0.0, abs=1e-15)


def test_ece_ignores_threshold():
    labels, p = _binary_data(n=100, seed=7)
    assert (
        classification_metrics(labels, p, threshold=0.2)["ece"]
        == classification_metrics(labels, p)["ece"]
    )


# ------------------------------------------------------------------------------------------
# Multi-class
# ------------------------------------------------------------------------------------------


def test_multiclass_matches_sklearn():
    labels, probs = _multiclass_data()
    c = probs.shape[1]
    m = _quiet(classification_metrics, labels, probs, num_classes=c)
    assert tuple(m) == MULTICLASS_METRIC_KEYS
    pred = probs.argmax(axis=1)
    np.testing.assert_allclose(m["accuracy"], accuracy_score(labels, pred), rtol=1e-12)
    for avg in ("macro", "micro"):
        prec, rec, f1, _ = precision_recall_fscore_support(
            labels, pred, labels=range(c), average=avg, zero_division=0
        )
        np.testing.assert_allclose(m[f"precision_{avg}"], prec, rtol=1e-12)
        np.testing.assert_allclose(m[f"recall_{avg}"], rec, rtol=1e-12)
        np.testing.assert_allclose(m[f"f1_{avg}"], f1, rtol=1e-12)
    mcm = multilabel_confusion_matrix(labels, pred, labels=range(c))  # [[tn, fp], [fn, tp]]
    spec = mcm[:, 0, 0] / (mcm[:, 0, 0] + mcm[:, 0, 1])
    np.testing.assert_allclose(m["specificity_macro"], spec.mean(), rtol=1e-12)
    per_class_recall = recall_score(labels, pred, labels=range(c), average=None)
    np.testing.assert_allclose(m["g_mean"], np.prod(per_class_recall) ** (1 / c), rtol=1e-12)
    np.testing.assert_allclose(
        m["roc_auc_macro"],
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
        rtol=1e-12,
    )
    np.testing.assert_allclose(m["ece"], _naive_ece(labels, probs, 15), rtol=1e-12)


def test_multiclass_ties_match_sklearn():
    labels, probs = _multiclass_data(n=300, seed=2)
    coarse = np.round(probs, 1)
    coarse /= coarse.sum(axis=1, keepdims=True)
    m = classification_metrics(labels, coarse)
    ref = roc_auc_score(labels, coarse, multi_class="ovr", average="macro")
    np.testing.assert_allclose(m["roc_auc_macro"], ref, rtol=1e-12)


def test_multiclass_perfect_predictions():
    labels = np.array([0, 1, 2, 3, 2, 1])
    m = _quiet(classification_metrics, labels, np.eye(4)[labels])
    for k in MULTICLASS_METRIC_KEYS:
        assert m[k] == (0.0 if k == "ece" else 1.0), k


def test_multiclass_binary_g_mean_agree():
    """For C = 2 the multi-class G-mean (root of per-class recalls) is sqrt(recall * spec)."""
    labels, p = _binary_data(seed=8)
    m = classification_metrics(labels, p)
    pred = (p > 0.5).astype(int)
    per_class = recall_score(labels, pred, average=None)
    np.testing.assert_allclose(m["g_mean"], np.sqrt(np.prod(per_class)), rtol=1e-12)


def test_multiclass_absent_class():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 40)  # class 3 never occurs
    probs = rng.dirichlet(np.ones(4), 40)
    with pytest.warns(UndefinedMetricWarning, match=r"classes \[3\] are absent"):
        m = classification_metrics(labels, probs)
    assert math.isnan(m["roc_auc_macro"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = roc_auc_score(labels, probs, multi_class="ovr", labels=range(4))
        except ValueError:  # older scikit-learn raised instead of returning NaN
            ref = math.nan
    assert math.isnan(ref)
    pred = probs.argmax(axis=1)
    prec, rec, f1, _ = precision_recall_fscore_support(
        labels, pred, labels=range(4), average="macro", zero_division=0
    )
    np.testing.assert_allclose(
        [m["precision_macro"], m["recall_macro"], m["f1_macro"]], [prec, rec, f1], rtol=1e-12
    )
    assert m["g_mean"] == 0.0  # the absent class's recall is 0 by convention


def test_multiclass_threshold_rejected():
    labels, probs = _multiclass_data(n=10)
    with pytest.raises(ValueError, match="argmax"):
        classification_metrics(labels, probs, threshold=0.3)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "probs", "kwargs", "match"),
    [
        ([0, 1, 1], [0.2, 0.8], {}, r"labels.shape == \(3,\) while probs.shape == \(2,\)"),
        ([0, 2], [0.2, 0.8], {}, r"labels must lie in \[0, 2\).*e.g. 2"),
        ([0, -1], [0.2, 0.8], {}, r"lie in \[0, 2\)"),
        ([0, 0.5], [0.2, 0.8], {}, "class indices"),
        ([0, 1], [0.2, 1.3], {}, "outside, min 0.2, max 1.3"),
        ([0, 1], [-0.1, 0.8], {}, r"\[0, 1\] \(probabilities, not logits\)"),
        ([0, 1], [np.nan, 0.8], {}, "1 NaN/inf"),
        ([0, 1], [[0.2, 0.7], [0.5, 0.5]], {}, "row 0 sums to 0.9"),
        ([0, 1, 2], [[0.2, 0.3, 0.4]] * 3, {}, "must sum to 1"),
        ([0, 1], [0.2, 0.8], {"num_classes": 3}, "describe 2 classes"),
        ([0, 1, 2], np.full((3, 3), 1 / 3), {"num_classes": 2}, "describe 3 classes"),
        ([], np.zeros(0), {}, "at least one example"),
        ([0, 1], np.zeros((2, 2, 2)), {}, "must have shape"),
        ([0, 1], [0.2, 0.8], {"threshold": 1.5}, "threshold"),
        ([0, 1], [0.2, 0.8], {"n_bins": 0}, "n_bins"),
        ([0, 1], [0.2, 0.8], {"loss": "x"}, "loss"),
    ],
)
def test_invalid_input(labels, probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs, **kwargs)


def test_row_sum_tolerance():
    probs = np.array([[0.3, 0.7 + PROB_SUM_ATOL / 2], [0.5, 0.5]])
    classification_metrics([1, 0], probs)  # within tolerance: accepted


# ------------------------------------------------------------------------------------------
# Reliability diagram and plot
# ------------------------------------------------------------------------------------------


def test_reliability_diagram_multiclass():
    labels, probs = _multiclass_data(n=200, seed=9)
    d = reliability_diagram(labels, probs, n_bins=10)
    assert d["bin_edges"].shape == (11,) and d["count"].shape == (10,)
    assert d["count"].dtype == np.int64 and d["count"].sum() == 200
    filled = d["count"] > 0
    assert np.isnan(d["accuracy"][~filled]).all() and np.isnan(d["confidence"][~filled]).all()
    # Mean confidence of each non-empty bin lies inside the bin.
    lo, hi = d["bin_edges"][:-1][filled], d["bin_edges"][1:][filled]
    assert np.all((d["confidence"][filled] > lo) & (d["confidence"][filled] <= hi))
    assert d["ece"] == classification_metrics(labels, probs, n_bins=10)["ece"]
    np.testing.assert_allclose(d["ece"], _naive_ece(labels, probs, 10), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Binary micro averages (El Azhari reports micro precision, recall and F1)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, pred", [
    ([0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1]),
    ([1, 1, 1, 1], [0, 0, 0, 0]),  # no predicted positives: binary precision 0, micro not
    ([0, 0, 0], [0, 0, 0]),  # one class only
])
def test_binary_micro_matches_sklearn_edge_cases(labels, pred):
    with warnings.catch_warnings():  # one-class cases: the AUC (not tested here) is NaN
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        m = classification_metrics(np.array(labels), np.array(pred, np.float64))  # p in {0,1}
    want = precision_recall_fscore_support(labels, pred, average="micro", labels=[0, 1],
                                           zero_division=0)
    got = (m["precision_micro"], m["recall_micro"], m["f1_micro"])
    np.testing.assert_allclose(got, want[:3], rtol=1e-12)
    # Single-label binary data: every micro average is the accuracy.
    np.testing.assert_allclose(got, [accuracy_score(labels, pred)] * 3, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# auc_ci
# ------------------------------------------------------------------------------------------


def _sklearn_stratified_bootstrap(labels, scores, n_boot, seed):
    """The documented draw, each resample's AUC from scikit-learn."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        i = rng.integers(0, pos.size, pos.size)
        j = rng.integers(0, neg.size, neg.size)
        y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        out.append(roc_auc_score(y, np.r_[pos[i], neg[j]]))
    return np.array(out)


@pytest.mark.parametrize("coarse", [False, True])
def test_auc_ci_matches_sklearn_on_the_same_resamples(coarse):
    labels, p = _binary_data(n=120, seed=11)
    scores = np.round(p, 1) if coarse else p  # ties within and across classes
    res = _quiet(auc_ci, labels, scores, n_resamples=300, seed=7, confidence=0.9)
    want = _sklearn_stratified_bootstrap(labels, scores, 300, 7)
    np.testing.assert_allclose(res.distribution, want, rtol=1e-12)
    np.testing.assert_allclose(res.estimate, roc_auc_score(labels, scores), rtol=1e-12)
    np.testing.assert_allclose([res.low, res.high], np.percentile(want, [5, 95]), rtol=1e-12)
    np.testing.assert_allclose(res.std, np.std(want, ddof=1), rtol=1e-12)
    assert (res.confidence, res.n_resamples, res.method) == (0.9, 300, "percentile")
    assert res.distribution.dtype == np.float64 and res.distribution.shape == (300,)
    assert res.low < res.estimate < res.high


def test_auc_ci_other_seed_agrees_within_monte_carlo_error():
    labels, p = _binary_data(n=200, seed=12)
    a = auc_ci(labels, p, n_resamples=2000, seed=0)
    b = _sklearn_stratified_bootstrap(labels, p, 2000, 123)  # independent resamples
    lo, hi = np.percentile(b, [2.5, 97.5])
    # Monte Carlo error of a 2.5% quantile from 2000 resamples is ~0.005 here.
    assert abs(a.low - lo) < 0.02 and abs(a.high - hi) < 0.02
    again = auc_ci(labels, p, n_resamples=2000, seed=0)  # deterministic for a seed
    np.testing.assert_array_equal(again.distribution, a.distribution)


def test_auc_ci_accepts_logits_and_probability_columns():
    labels, p = _binary_data(n=60, seed=13)
    logit = np.log(p / (1 - p))  # outside [0, 1]; same ranks as p
    ref = auc_ci(labels, p, n_resamples=50, seed=1)
    for scores in (logit, p[:, None], np.stack([1 - p, p], axis=1)):
        got = auc_ci(labels, scores, n_resamples=50, seed=1)
        np.testing.assert_allclose(got.distribution, ref.distribution, rtol=1e-12)
        assert (got.estimate, got.low, got.high) == pytest.approx(
            (ref.estimate, ref.low, ref.high), rel=1e-12)


@pytest.mark.parametrize("labels, scores, kwargs, match", [
    ([1, 1, 1], [0.2, 0.4, 0.9], {}, "needs both classes"),
    ([0, 1, 2], [0.2, 0.4, 0.9], {}, "labels must lie in"),
    ([0, 1], [0.2, np.nan], {}, "NaN/inf"),
    ([0, 1], [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], {}, "shape"),
    ([0, 1, 1], [0.2, 0.4], {}, "labels must have shape"),
    ([0, 1], [0.2, 0.4], {"n_resamples": 0}, "n_resamples"),
    ([0, 1], [0.2, 0.4], {"confidence": 1.0}, "confidence"),
])
def test_auc_ci_invalid_input(labels, scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        auc_ci(labels, scores, **kwargs)
