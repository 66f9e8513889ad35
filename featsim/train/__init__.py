"""Training loops that test the transfer claims: linear probe, partial, full, scratch, meanvar."""

from featsim.train.augment import AugmentConfig, augment_batch
from featsim.train.config import SCHEDULES, STRATEGIES, TrainConfig
from featsim.train.data import Dataset, batches, load_dataset, split_validation
from featsim.train.evaluation import (
    classification_metrics,
    plot_reliability,
    reliability_diagram,
    summarize_runs,
)
from featsim.train.loop import create_train_state, evaluate, run_seeds, train_and_evaluate
from featsim.train.losses import class_weights, weighted_bce, weighted_softmax_ce
from featsim.train.steps import TrainState, make_eval_step, make_train_step

__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "AugmentConfig",
    "Dataset",
    "TrainConfig",
    "TrainState",
    "augment_batch",
    "batches",
    "class_weights",
    "classification_metrics",
    "create_train_state",
    "evaluate",
    "load_dataset",
    "make_eval_step",
    "make_train_step",
    "plot_reliability",
    "reliability_diagram",
    "run_seeds",
    "split_validation",
    "summarize_runs",
    "train_and_evaluate",
    "weighted_bce",
    "weighted_softmax_ce",
]
