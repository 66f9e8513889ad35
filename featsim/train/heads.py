"""Classifier heads beside the backbones' own global-pool + linear one, for any backbone.

* ``"linear"``: the backbone's own classifier on ``pre_logits`` (global average pool, one
  dense layer), as today.
* ``"flatten_mlp"``: El Azhari (2022, "Transfer learning for Covid-19 detection in medical
  images", sec. 3.1.4): "a Flatten layer added after the last pooling layer [...], plus a
  Dense fully connected layer composed of 1000 neurons. The last output layer predicts the
  [...] classes": ``Dense(classes)(relu(Dense(hidden)(flatten(fmap))))`` on the backbone's
  last convolutional feature map ``fmap`` ``[N, H, W, C]``, so the head has
  ``H*W*C*hidden + hidden + hidden*classes + classes`` parameters (her Table 1: 65,000 and
  2,002 for a 1x1x64 map, 2 classes). The paper names no activation for the hidden layer;
  featsim uses ReLU (without one the two layers would collapse to a single linear map).
  Kernels use Glorot-uniform init and zero biases, the Keras defaults she trained with. The
  flattened size fixes the input resolution: the head is built for the backbone's
  ``input_size`` (what :func:`~featsim.train.datasets.load_dataset` resizes to).

An auxiliary regression head (Park, "Cross-domain transfer learning for medical condition
classification from infant X-ray images", eq. 3-4: ``L_total = L_CE + alpha * L_MSE`` with
age as the target) is one more dense layer on ``pre_logits`` whose ``[N, T]`` output is
returned as ``features[AUX_KEY]``; :func:`featsim.train.strategies.leaf_stages` counts it
as head, so every strategy trains it.

The feature map ``fmap`` is ``features["pre_pool"]`` where a backbone exposes that tap, else
the deepest 4-D tap in network order (:func:`pre_pool_feature`): ResNet/ResNeXt ``stage4``,
MobileNet ``stage5``, EfficientNet ``head``, ShuffleNet ``conv5``, Inception ``stage3`` (the
maps their global pool reads), VGG ``stage5`` (after the last max-pool: exactly the paper's
"after the last pooling layer"; VGG's fc6/fc7 still compute ``pre_logits`` but do not feed
this head). DenseNet's deepest tap is ``stage4`` *before* its final BatchNorm + ReLU
(``norm5``), which then feeds only ``pre_logits``.

The backbone and the new layers share one variable namespace (:func:`flax.linen.share_scope`),
so the body's variables keep the keys of the plain backbone and pretrained checkpoints load
unchanged (:func:`load_pretrained_model`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from featsim.backbones.registry import Backbone, get_backbone, load_pretrained
from featsim.train.strategies import AUX_KEY, meanvar_init, tap_order

__all__ = [
    "AUX_KEY",
    "HeadedBackbone",
    "build_model",
    "initial_variables",
    "load_pretrained_model",
    "model_for",
    "pre_pool_feature",
]


def pre_pool_feature(features) -> str:
    """The name of the last convolutional feature map in a backbone's ``features`` dict:
    ``"pre_pool"`` if present, else the deepest 4-D (NHWC) tap in network order.

    Raises:
        ValueError: no 4-D feature (the names and shapes found are listed).
    """
    if "pre_pool" in features:
        return "pre_pool"
    maps = [k for k in tap_order(k for k in features if k != AUX_KEY)
            if jnp.ndim(features[k]) == 4]
    if not maps:
        shapes = {k: tuple(jnp.shape(v)) for k, v in features.items()}
        raise ValueError(f"flatten_mlp needs a 4-D [N, H, W, C] feature map; the backbone "
                         f"returns only {shapes}")
    return maps[-1]


class HeadedBackbone(nn.Module):
    """A backbone with a ``flatten_mlp`` head and/or an auxiliary regression head.

    ``__call__(x, *, train=False)`` returns ``(logits, features)`` like any backbone:
    ``logits [N, num_classes]`` from the backbone's own head (``head="linear"``; build
    ``backbone`` with ``num_classes``) or from the flatten-MLP (``head="flatten_mlp"``; build
    it headless, ``num_classes=None``), and ``features`` the backbone's, plus
    ``features[AUX_KEY]`` ``[N, aux_outputs]`` when ``aux_outputs > 0``.

    Attributes:
        backbone: the registered module.
        head: ``"linear"`` or ``"flatten_mlp"``.
        num_classes: outputs of the flatten-MLP head (ignored for ``"linear"``).
        hidden: width of the flatten-MLP's hidden layer (El Azhari: 1000).
        aux_outputs: regression outputs on ``pre_logits``; 0 = no auxiliary head.
    """

    backbone: nn.Module
    head: str = "linear"
    num_classes: int = 1
    hidden: int = 1000
    aux_outputs: int = 0

    def setup(self):
        nn.share_scope(self, self.backbone)  # body keys == the plain backbone's keys
        dtype = getattr(self.backbone, "dtype", jnp.float32)
        param_dtype = getattr(self.backbone, "param_dtype", jnp.float32)
        keras = {"kernel_init": nn.initializers.glorot_uniform(),
                 "bias_init": nn.initializers.zeros}
        if self.head == "flatten_mlp":
            self.mlp_hidden = nn.Dense(self.hidden, dtype=dtype, param_dtype=param_dtype,
                                       **keras)
            self.mlp_logits = nn.Dense(self.num_classes, dtype=dtype,
                                       param_dtype=param_dtype, **keras)
        elif self.head != "linear":
            raise ValueError(f'head must be "linear" or "flatten_mlp", got {self.head!r}')
        if self.aux_outputs:
            self.aux_head = nn.Dense(self.aux_outputs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, *, train: bool = False):
        logits, features = self.backbone(x, train=train)
        if self.head == "flatten_mlp":
            fmap = features[pre_pool_feature(features)]
            hidden = nn.relu(self.mlp_hidden(fmap.reshape(fmap.shape[0], -1)))
            logits = self.mlp_logits(hidden)
        if self.aux_outputs:
            features = {**features, AUX_KEY: self.aux_head(features["pre_logits"])}
        return logits, features


def build_model(name: str, num_classes: int, *, head: str = "linear", hidden: int = 1000,
                aux_outputs: int = 0, **kwargs) -> Backbone:
    """The registered backbone ``name`` with the requested heads, as a :class:`Backbone`
    (same preprocessing and weights source).

    With ``head="linear"`` and no auxiliary head this is exactly
    ``get_backbone(name, num_classes=num_classes, **kwargs)``.

    Args:
        name: registry name.
        num_classes: classifier outputs (1 for a sigmoid head).
        head: ``"linear"`` or ``"flatten_mlp"``.
        hidden: the flatten-MLP's hidden width.
        aux_outputs: auxiliary regression outputs (0: none).
        **kwargs: module fields for the backbone (``bn_axis_name``, ``dtype``, ...).

    Example:
        >>> model = build_model("resnet18", 3, head="flatten_mlp")
        >>> logits, feats = model.module.apply(model.init(key), x)  # doctest: +SKIP
    """
    if head not in ("linear", "flatten_mlp"):
        raise ValueError(f'head must be "linear" or "flatten_mlp", got {head!r}')
    if hidden < 1 or aux_outputs < 0:
        raise ValueError(f"hidden must be >= 1 and aux_outputs >= 0, got hidden={hidden}, "
                         f"aux_outputs={aux_outputs}")
    base = get_backbone(name, num_classes=num_classes if head == "linear" else None, **kwargs)
    if head == "linear" and not aux_outputs:
        return base
    module = HeadedBackbone(base.module, head=head, num_classes=num_classes, hidden=hidden,
                            aux_outputs=aux_outputs)
    return dataclasses.replace(base, module=module)


def model_for(config, num_classes: int, **kwargs) -> Backbone:
    """:func:`build_model` for a :class:`~featsim.train.TrainConfig`.

    With ``config.compute_dtype`` other than float32 the backbone's layers compute in it
    (its ``dtype`` field; parameters and BatchNorm statistics stay float32).

    Raises:
        ValueError: a compute dtype for a backbone module without a ``dtype`` field.
    """
    compute = getattr(config, "compute_dtype", "float32")
    if compute != "float32":
        probe = get_backbone(config.backbone, num_classes=None)
        if "dtype" not in {f.name for f in dataclasses.fields(probe.module)}:
            raise ValueError(f"compute_dtype={compute!r}: backbone {config.backbone!r} "
                             f"({type(probe.module).__name__}) has no dtype field; use "
                             "compute_dtype='float32'")
        kwargs = {"dtype": jnp.dtype(compute), **kwargs}
    return build_model(config.backbone, num_classes, head=config.head,
                       hidden=config.head_hidden, aux_outputs=config.aux_targets, **kwargs)


def load_pretrained_model(model: Backbone, *, path=None, rng: jax.Array) -> Backbone:
    """``model`` with its body's pretrained variables and freshly initialised heads.

    The body comes from :func:`~featsim.backbones.load_pretrained` (``skip_head=True``: the
    registered checkpoint or ``path``); every variable it does not provide (the flatten-MLP,
    the auxiliary head, a new linear classifier) is initialised from ``rng``.
    """
    if not isinstance(model.module, HeadedBackbone):
        return load_pretrained(model, path=path, skip_head=True, rng=rng)
    body_key, head_key = jax.random.split(rng)
    body = load_pretrained(dataclasses.replace(model, module=model.module.backbone),
                           path=path, skip_head=True, rng=body_key)
    flat = traverse_util.flatten_dict(body.variables)
    template = traverse_util.flatten_dict(model.abstract_variables())
    unknown = sorted(set(flat) - set(template))
    if unknown:  # share_scope keeps the body's keys; anything else is a bug
        raise ValueError(f"body variables not in the headed model: {unknown[:5]}")
    new = [k for k in template if k not in flat]

    def init_new(key, x):  # under jit only the new leaves are computed (dead-code elim.)
        full = traverse_util.flatten_dict(model.module.init(key, x, train=False))
        return {k: full[k] for k in new}

    flat.update(jax.jit(init_new)(head_key, jnp.zeros(model.input_shape, jnp.float32)))
    variables = jax.tree.map(np.asarray, traverse_util.unflatten_dict(flat))
    return dataclasses.replace(model, variables=variables, weights_file=body.weights_file)


def initial_variables(config, num_classes: int, rng: jax.Array, weights=None):
    """``(model, variables)`` a run of ``config`` starts from, variables as numpy: the
    pretrained body with a new head, a random init (``scratch``, ``init="random"``), or Mean
    Var (``meanvar``: kernels drawn around the pretrained values, BatchNorm statistics
    fresh, since they described the pretrained activations). ``model`` is the
    :func:`model_for` backbone (with the pretrained ``weights_file`` when one was read);
    ``weights``: a checkpoint instead of the registered one."""
    model = model_for(config, num_classes)
    head_key, init_key = jax.random.split(rng)
    if config.strategy == "scratch" or config.init == "random":
        return model, jax.tree.map(np.asarray, model.init(init_key))
    pretrained = load_pretrained_model(model, path=weights, rng=head_key)
    variables = pretrained.variables
    if config.strategy == "meanvar":
        variables = dict(variables, params=meanvar_init(variables["params"], init_key))
        if "batch_stats" in variables:
            variables["batch_stats"] = jax.tree.map(np.asarray,
                                                    model.init(init_key))["batch_stats"]
    return pretrained, variables
