"""Training hyperparameters: one frozen value, never read inside a step function.

The defaults are Gu & Lee's recipe where the paper gives one (section 5.6: 20 epochs, batch
64, a new fully connected sigmoid head on a frozen ImageNet body, class-weighted BCE;
section 5.7: augmentation and mean 0.5 / std 0.5 normalisation). The paper does not name
its optimiser or learning rate; featsim uses Adam at 1e-3 (PyTorch's and Keras' default),
and the paper's "learning rate x 0.1" variant (its Table 3) is ``learning_rate=1e-4``.
"""

from __future__ import annotations

import dataclasses
import json

from featsim.train.augment import AugmentConfig

__all__ = ["SCHEDULES", "STRATEGIES", "TrainConfig"]

# linear:   the paper's: frozen body (incl. BatchNorm statistics), new head.
# partial:  unfreeze the last `partial_stages` stages and the head.
# finetune: every layer, the body at `learning_rate * body_lr_scale`.
# scratch:  random init of the same architecture, every layer at `learning_rate`.
# meanvar:  Raghu et al. 2019's Mean Var init: each kernel i.i.d. N(mean, var) of its
#           pretrained values, then trained like scratch.
STRATEGIES = ("linear", "partial", "finetune", "scratch", "meanvar")
SCHEDULES = ("constant", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in its workdir as JSON).

    Attributes:
        backbone: registry name.
        strategy: one of :data:`STRATEGIES`.
        epochs, batch_size: the paper's 20 and 64 by default (global batch, all devices).
        learning_rate: peak learning rate of the head (and of every layer for scratch).
        body_lr_scale: the body's learning rate over the head's, for finetune/partial.
        partial_stages: how many of the last stages ``partial`` unfreezes.
        schedule: one of :data:`SCHEDULES` (step: x0.1 at 50% and 75% of training).
        warmup_epochs: linear warm-up before the schedule.
        weight_decay: decoupled (AdamW) weight decay; 0 = Adam.
        class_weighting: ``"balanced"`` (n / (C * count_c), Keras/sklearn) or ``"none"``.
        normalization: pixel scaling, ``"paper"`` (mean 0.5 / std 0.5, section 5.7) or
            ``"backbone"`` (the weights' own).
        augment: on-device augmentation (section 5.7); ``AugmentConfig(enabled=False)`` to
            turn it off. ``linear`` without augmentation trains the head on cached
            ``pre_logits`` features (the same computation, much faster).
        val_fraction: share of train carved out (stratified; group-aware when the source
            has groups) for early stopping and model selection; test is never used for
            either.
        early_stopping_patience: epochs without a better validation loss before stopping;
            None: train all epochs (the last epoch's model is evaluated).
        image_dtype: how decoded training images are held in memory: ``"uint8"`` (rounded,
            4x smaller) or ``"float32"`` (bit-compatible with the feature pipeline).
        seed: PRNG seed (head init, data order, augmentation, validation split).
    """

    backbone: str
    strategy: str = "linear"
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    body_lr_scale: float = 0.1
    partial_stages: int = 1
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    class_weighting: str = "balanced"
    normalization: str = "paper"
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    val_fraction: float = 0.0
    early_stopping_patience: int | None = None
    image_dtype: str = "uint8"
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.body_lr_scale >= 0, "body_lr_scale must be >= 0"),
            (self.partial_stages >= 1, "partial_stages must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.class_weighting in ("balanced", "none"),
             'class_weighting must be "balanced" or "none"'),
            (self.normalization in ("paper", "backbone"),
             'normalization must be "paper" or "backbone"'),
            (self.image_dtype in ("uint8", "float32"), 'image_dtype must be "uint8" or "float32"'),
            (self.early_stopping_patience is None or self.val_fraction > 0,
             "early stopping needs a validation split (val_fraction > 0)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}")

    @property
    def uses_cached_features(self) -> bool:
        """``linear`` without augmentation: the body's output never changes, so the head
        trains on cached ``pre_logits`` features."""
        return self.strategy == "linear" and not self.augment.enabled

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, value: dict) -> TrainConfig:
        value = dict(value)
        if isinstance(value.get("augment"), dict):  # JSON lists back to (hashable) tuples
            value["augment"] = AugmentConfig(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in value["augment"].items()})
        return cls(**value)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
