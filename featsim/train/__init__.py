"""Training loops that test the transfer claims: linear probe, partial, full, scratch, meanvar.

Modules: ``config`` (``TrainConfig``, ``AugmentConfig``: plain values, no JAX), ``loop``
(``train_and_evaluate``, ``run_seeds``), ``linear_probe`` (the cached-feature path),
``pretraining`` (autoencoder pretraining), ``epoch`` (the epoch driver all three share),
``steps``, ``heads``, ``strategies``, ``optim``, ``losses``, ``augment``, ``batchnorm``,
``datasets``, ``callbacks`` (``StopWhen``), ``classification`` (metrics of a classifier),
``summary`` (mean and std over seeds), ``predict``. A run's folder is
:class:`featsim.rundir.RunDir`.
"""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim._lazy import lazy_exports

# name -> module under featsim.train. Importing this package is cheap: each name loads its
# module (and JAX) on first use (PEP 562), so `featsim train --help` reads TrainConfig's
# fields without JAX.
_EXPORTS = {
    "HEADS": "config",
    "INITS": "config",
    "SCHEDULES": "config",
    "STRATEGIES": "config",
    "AugmentConfig": "config",
    "ConvAutoencoder": "autoencoder",
    "ConvDecoder": "autoencoder",
    "Dataset": "datasets",
    "HeadedBackbone": "heads",
    "PretrainConfig": "pretraining",
    "StopWhen": "callbacks",
    "TrainConfig": "config",
    "TrainState": "steps",
    "auc_ci": "classification",
    "augment_batch": "augment",
    "batches": "datasets",
    "build_model": "heads",
    "class_weights": "losses",
    "classification_metrics": "classification",
    "create_train_state": "loop",
    "evaluate": "loop",
    "load_dataset": "datasets",
    "load_unlabelled": "pretraining",
    "make_eval_step": "steps",
    "make_train_step": "steps",
    "multitask_loss": "losses",
    "pretrain": "pretraining",
    "recompute_batch_stats": "batchnorm",
    "reliability_diagram": "classification",
    "run_seeds": "loop",
    "split_validation": "datasets",
    "summarize_runs": "summary",
    "train_and_evaluate": "loop",
    "weighted_bce": "losses",
    "weighted_softmax_ce": "losses",
}

__all__ = [
    "HEADS",
    "INITS",
    "SCHEDULES",
    "STRATEGIES",
    "AugmentConfig",
    "ConvAutoencoder",
    "ConvDecoder",
    "Dataset",
    "HeadedBackbone",
    "PretrainConfig",
    "StopWhen",
    "TrainConfig",
    "TrainState",
    "auc_ci",
    "augment_batch",
    "batches",
    "build_model",
    "class_weights",
    "classification_metrics",
    "create_train_state",
    "evaluate",
    "load_dataset",
    "load_unlabelled",
    "make_eval_step",
    "make_train_step",
    "multitask_loss",
    "pretrain",
    "recompute_batch_stats",
    "reliability_diagram",
    "run_seeds",
    "split_validation",
    "summarize_runs",
    "train_and_evaluate",
    "weighted_bce",
    "weighted_softmax_ce",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
