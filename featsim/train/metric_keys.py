"""The names of :func:`featsim.train.classification.classification_metrics`' results.

Plain tuples with no imports, so that what reads only the names (``StopWhen`` validating
``val_<metric>`` conditions, ``featsim train --help``) loads nothing numerical.
"""

__all__ = ["BINARY_METRIC_KEYS", "MULTICLASS_METRIC_KEYS"]

#: Keys of ``classification_metrics`` for binary problems, in order (``"loss"`` is appended
#: when ``loss`` is given). ``tp, fp, tn, fn`` are ``int`` counts, the rest floats.
BINARY_METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "g_mean",
    "roc_auc",
    "ece",
    "tp",
    "fp",
    "tn",
    "fn",
)

#: Keys of ``classification_metrics`` for ``C >= 3`` classes, in order (``"loss"`` is
#: appended when ``loss`` is given).
MULTICLASS_METRIC_KEYS = (
    "accuracy",
    "precision_macro",
    "precision_micro",
    "recall_macro",
    "recall_micro",
    "f1_macro",
    "f1_micro",
    "specificity_macro",
    "g_mean",
    "roc_auc_macro",
    "ece",
)
