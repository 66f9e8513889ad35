"""Training loops that test the transfer claims: linear probe, partial, full, scratch, meanvar."""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim.train.augment import AugmentConfig, augment_batch
from featsim.train.autoencoder import ConvAutoencoder, ConvDecoder
from featsim.train.batchnorm import recompute_batch_stats
from featsim.train.callbacks import StopWhen
from featsim.train.config import HEADS, INITS, SCHEDULES, STRATEGIES, TrainConfig
from featsim.train.data import Dataset, batches, load_dataset, split_validation
from featsim.train.evaluation import (
    auc_ci,
    classification_metrics,
    plot_reliability,
    reliability_diagram,
    summarize_runs,
)
from featsim.train.heads import HeadedBackbone, build_model
from featsim.train.loop import create_train_state, evaluate, run_seeds, train_and_evaluate
from featsim.train.losses import (
    class_weights,
    multitask_loss,
    weighted_bce,
    weighted_softmax_ce,
)
from featsim.train.pretrain import PretrainConfig, load_unlabelled, pretrain
from featsim.train.steps import TrainState, make_eval_step, make_train_step

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
    "plot_reliability",
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
