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
import os
from pathlib import Path

from featsim.train.callbacks import StopWhen

__all__ = [
    "CLASS_WEIGHTINGS",
    "COMPUTE_DTYPES",
    "HEADS",
    "IMAGE_DTYPES",
    "INITS",
    "NORMALIZATIONS",
    "SCHEDULES",
    "STRATEGIES",
    "AugmentConfig",
    "TrainConfig",
]

# linear:   the paper's: frozen body (incl. BatchNorm statistics), new head.
# partial:  unfreeze the last `partial_stages` stages and the head.
# finetune: every layer, the body at `learning_rate * body_lr_scale`.
# scratch:  random init of the same architecture, every layer at `learning_rate`.
# meanvar:  Raghu et al. 2019's Mean Var init: each kernel i.i.d. N(mean, var) of its
#           pretrained values, then trained like scratch.
STRATEGIES = ("linear", "partial", "finetune", "scratch", "meanvar")
SCHEDULES = ("constant", "cosine", "step")
# linear:      the backbone's own global-pool + linear classifier.
# flatten_mlp: El Azhari's Flatten + Dense(head_hidden) + ReLU + Dense(classes) on the last
#              convolutional feature map (featsim.train.heads).
HEADS = ("linear", "flatten_mlp")
# pretrained: the body starts from the backbone's weights (the default).
# random:     the body starts from its own random initialisation (seeded), e.g. with
#             ``linear`` a random-features probe (El Azhari's "random weights, frozen").
INITS = ("pretrained", "random")
# balanced: n / (C * count_c) per class (Keras/sklearn); none: every class weighs 1.
CLASS_WEIGHTINGS = ("balanced", "none")
# paper: mean 0.5 / std 0.5 (Gu & Lee sec. 5.7); backbone: the weights' own scaling.
NORMALIZATIONS = ("paper", "backbone")
# How decoded images are held: uint8 (4x smaller) or float32 (as the feature pipeline).
IMAGE_DTYPES = ("uint8", "float32")
# The dtype of the forward and backward pass; parameters, optimiser state and BatchNorm
# statistics stay float32 (mixed precision).
COMPUTE_DTYPES = ("float32", "bfloat16")
_MAX_PIXEL = 255.0


def _pair(name, value):
    if isinstance(value, (int, float)) or len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the section 5.7 pipeline (:mod:`featsim.train.augment` gives their sources).

    Frozen and hashable, so it can be a static argument of ``jax.jit``;
    ``AugmentConfig(**json.loads(json.dumps(dataclasses.asdict(c)))) == c``.

    Attributes:
        enabled: ``False`` turns the whole pipeline into the identity.
        crop_scale: ``RandomResizedCrop`` area fraction range, ``0 < min <= max``.
        crop_ratio: ``RandomResizedCrop`` aspect ratio (width / height) range, log-uniform.
        crop_attempts: candidates before the centre-crop fallback.
        brightness: ``ColorJitter`` brightness; factor uniform in ``[max(0, 1-b), 1+b]``.
        contrast: ``ColorJitter`` contrast, same form.
        saturation: ``ColorJitter`` saturation, same form.
        hue: ``ColorJitter`` hue in ``[0, 0.5]``; shift uniform in ``[-hue, hue]`` turns.
        jitter_random_order: apply the enabled colour ops in a random order per example
            (torchvision); ``False``: brightness, contrast, saturation, hue.
        hflip_prob: probability of a horizontal flip.
        rotation_degrees: rotation angle range in degrees, counter-clockwise positive.
        fill: value of output pixels that come from outside the (rotated) crop.
        grayscale_prob: probability of converting to 3-channel grayscale.
    """

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    crop_attempts: int = 10
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    jitter_random_order: bool = True
    hflip_prob: float = 0.5
    rotation_degrees: tuple[float, float] = (-10.0, 10.0)
    fill: float = 0.0
    grayscale_prob: float = 1.0

    def __post_init__(self):
        # Store tuples and floats whatever was given (JSON gives lists), so the value hashes.
        for name in ("crop_scale", "crop_ratio", "rotation_degrees"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for name in (
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "hflip_prob",
            "fill",
            "grayscale_prob",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.crop_scale[0] <= 0:
            raise ValueError(f"crop_scale must be positive, got {self.crop_scale!r}")
        if self.crop_ratio[0] <= 0:
            raise ValueError(f"crop_ratio must be positive, got {self.crop_ratio!r}")
        if int(self.crop_attempts) != self.crop_attempts or self.crop_attempts < 1:
            raise ValueError(f"crop_attempts must be a positive int, got {self.crop_attempts!r}")
        object.__setattr__(self, "crop_attempts", int(self.crop_attempts))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        for name in ("hflip_prob", "grayscale_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.fill <= _MAX_PIXEL:
            raise ValueError(f"fill must be in [0, 255], got {self.fill!r}")

    def colour_ops(self) -> tuple[str, ...]:
        """Names of the enabled colour-jitter ops, in the fixed (non-random) order."""
        return tuple(
            n for n in ("brightness", "contrast", "saturation", "hue") if getattr(self, n) > 0
        )


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
        class_weighting: ``"balanced"`` (n / (C * count_c), Keras/sklearn) or ``"none"``;
            it weights the cross-entropy term only, never the auxiliary regression term.
        head: one of :data:`HEADS` (:mod:`featsim.train.heads`). Every strategy trains the
            whole head (``linear``: both of the flatten-MLP's dense layers, body frozen).
            ``"flatten_mlp"`` always runs end to end (no cached-feature path).
        head_hidden: the flatten-MLP's hidden width (El Azhari: 1000).
        aux_weight: ``alpha`` of Park's ``L_CE + alpha * L_MSE`` (Park: 0.8), the weight of
            an auxiliary regression head on ``pre_logits``
            (:func:`~featsim.train.losses.multitask_loss`); test/validation metrics then
            include ``aux_mse`` and ``class_loss`` beside ``loss`` (the total). Ablations:
            ``aux_weight=0`` is "without the auxiliary head" (it is still built when
            ``aux_targets > 0`` and its MSE reported, but it does not train and does not
            change the classifier's training); "without pretraining" is
            ``strategy="scratch"``.
        aux_targets: number of regression outputs of the auxiliary head (0: none). With
            ``aux_targets > 0`` training runs end to end and the data needs targets.
        target_columns: ``labels.csv`` columns giving the regression targets, in order
            (``open_source(..., target_column=...)``); their number must equal
            ``aux_targets``. Empty: the datasets carry their own ``targets``.
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
        stop_when: stop after the first epoch where every ``(metric, operator,
            threshold)`` holds on the validation metrics, e.g. El Azhari's
            ``(("val_accuracy", ">=", 0.89), ("val_loss", "<", 0.3))``; see
            :class:`~featsim.train.callbacks.StopWhen` (also accepted here, as is its
            string form ``"val_accuracy>=0.89,val_loss<0.3"``; stored as the tuple). The
            stopping epoch's model is evaluated unless ``early_stopping_patience`` is set
            (then the best-validation-loss model is). None: no such rule.
        image_dtype: how decoded training images are held in memory: ``"uint8"`` (rounded,
            4x smaller) or ``"float32"`` (bit-compatible with the feature pipeline).
        compute_dtype: one of :data:`COMPUTE_DTYPES`: the forward and backward pass in
            ``"bfloat16"`` (activations and a bfloat16 copy of the weights; the loss, the
            parameters, the optimiser state and the BatchNorm statistics stay float32), for
            accelerators with bfloat16 units; ``"float32"`` (default) everywhere else.
        seed: PRNG seed (head init, data order, augmentation, validation split).
        init: one of :data:`INITS`: where the body starts for ``linear``, ``partial`` and
            ``finetune``. ``"random"`` with ``linear`` freezes a randomly initialised body
            (BatchNorm statistics at their initial values) and trains the head: a
            random-features probe. ``scratch`` is always random and ``meanvar`` needs
            the pretrained values, so both take only ``"pretrained"`` (the default).
        recompute_bn_stats: before every validation/test evaluation and before saving a
            model, replace the BatchNorm running statistics by their population values
            over the training split's images, un-augmented, preprocessed as at inference
            (:func:`~featsim.train.batchnorm.recompute_batch_stats`), for every strategy
            that trains BatchNorm (all but ``linear``; ``partial`` only its unfrozen
            stages). The training state keeps its running averages (a resumed run equals
            an uninterrupted one). With momentum 0.99 the running averages of a short run
            still hold mostly their initial values (``0.99 ** 45 = 0.64``) and the
            inference network can be nearly constant. False (an ablation): evaluate and
            save the running averages. Recorded as ``bn_stats`` in ``metrics.json``.
        bn_stats_images: use at most this many training images (a fixed, seeded subset)
            for the recomputation, which costs one forward pass over them per evaluation;
            None: all of them.
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
    head: str = "linear"
    head_hidden: int = 1000
    aux_weight: float = 0.0
    aux_targets: int = 0
    target_columns: tuple[str, ...] = ()
    normalization: str = "paper"
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    val_fraction: float = 0.0
    early_stopping_patience: int | None = None
    stop_when: tuple[tuple[str, str, float], ...] | None = None
    image_dtype: str = "uint8"
    compute_dtype: str = "float32"
    seed: int = 0
    init: str = "pretrained"
    recompute_bn_stats: bool = True
    bn_stats_images: int | None = None

    def __post_init__(self):
        if self.stop_when is not None:  # JSON lists, a StopWhen or its string: one tuple form
            rule = self.stop_when
            if isinstance(rule, str):
                rule = StopWhen.parse(rule)
            elif not isinstance(rule, StopWhen):
                rule = StopWhen(rule)
            object.__setattr__(self, "stop_when", rule.to_config())
        if isinstance(self.target_columns, str):
            object.__setattr__(self, "target_columns", (self.target_columns,))
        elif not isinstance(self.target_columns, tuple):  # e.g. a JSON list
            object.__setattr__(self, "target_columns", tuple(self.target_columns))
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.init in INITS, f"init must be one of {INITS}"),
            (self.init == "pretrained" or self.strategy in ("linear", "partial", "finetune"),
             'init="random" is for linear, partial and finetune (scratch is random already; '
             "meanvar needs the pretrained values)"),
            (self.head in HEADS, f"head must be one of {HEADS}"),
            (self.head_hidden >= 1, "head_hidden must be >= 1"),
            (self.aux_weight >= 0, "aux_weight must be >= 0"),
            (self.aux_targets >= 0, "aux_targets must be >= 0"),
            (self.aux_weight == 0 or self.aux_targets >= 1,
             "aux_weight > 0 needs an auxiliary head (aux_targets >= 1)"),
            (not self.target_columns or len(self.target_columns) == self.aux_targets,
             "target_columns must name aux_targets columns"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.body_lr_scale >= 0, "body_lr_scale must be >= 0"),
            (self.partial_stages >= 1, "partial_stages must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.class_weighting in CLASS_WEIGHTINGS,
             f"class_weighting must be one of {CLASS_WEIGHTINGS}"),
            (self.normalization in NORMALIZATIONS,
             f"normalization must be one of {NORMALIZATIONS}"),
            (self.image_dtype in IMAGE_DTYPES, f"image_dtype must be one of {IMAGE_DTYPES}"),
            (self.compute_dtype in COMPUTE_DTYPES,
             f"compute_dtype must be one of {COMPUTE_DTYPES}"),
            (self.early_stopping_patience is None or self.val_fraction > 0,
             "early stopping needs a validation split (val_fraction > 0)"),
            (self.stop_when is None or self.val_fraction > 0,
             "stop_when needs a validation split (val_fraction > 0)"),
            (self.bn_stats_images is None or self.bn_stats_images >= 2,
             "bn_stats_images must be None (all training images) or >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}")

    @property
    def uses_cached_features(self) -> bool:
        """``linear`` without augmentation, the linear head and no auxiliary head: the
        body's output never changes, so the head trains on cached ``pre_logits`` features.
        (The flatten-MLP reads the pre-pool map, which is not cached, and the cache holds
        pretrained features, not a random body's: both run end to end.)"""
        return (self.strategy == "linear" and not self.augment.enabled
                and self.head == "linear" and not self.aux_targets
                and self.init == "pretrained")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """The config a run saved (its ``config.json``, :meth:`to_json`).

        Raises:
            FileNotFoundError: no such file. ValueError: not JSON, not an object, fields
                :class:`TrainConfig` does not have, or invalid values (naming the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no TrainConfig file at {path} (a run's config.json)")
        try:
            value = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a JSON object of TrainConfig fields, got "
                             f"{type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig fields {unknown}; known: "
                             f"{sorted(known)}")
        try:
            return cls.from_dict(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, value: dict) -> TrainConfig:
        value = dict(value)
        if isinstance(value.get("augment"), dict):  # JSON lists back to (hashable) tuples
            value["augment"] = AugmentConfig(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in value["augment"].items()})
        return cls(**value)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def override(self, **options) -> TrainConfig:
        """:meth:`replace` as ``featsim train``'s flags spell the fields: ``augment`` may
        also be a bool (this config's augmentation turned on or off, its parameters kept),
        and ``target_columns`` given without ``aux_targets`` sets ``aux_targets`` to their
        number."""
        if isinstance(options.get("augment"), bool):
            options["augment"] = dataclasses.replace(self.augment, enabled=options["augment"])
        if "target_columns" in options and "aux_targets" not in options:
            options["aux_targets"] = len(options["target_columns"] or ())
        return dataclasses.replace(self, **options)
