"""The optimiser and the learning-rate schedule of a run (optax).

:func:`make_optimizer` gives each leaf label of :func:`featsim.train.strategies.strategy_labels`
its own transform (Adam or AdamW; ``optax.set_to_zero()`` for ``"frozen"``, so frozen
parameters stay bit-identical); :func:`schedule_for` builds the head's schedule from a
:class:`~featsim.train.TrainConfig`.
"""

from __future__ import annotations

import optax

__all__ = ["make_optimizer", "schedule_for"]


def make_optimizer(params_labels, schedule, *, body_lr_scale: float,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam(W) for ``"head"``, the same at ``body_lr_scale`` for ``"body"``, zero updates
    for ``"frozen"``.

    Args:
        params_labels: a pytree like ``params`` with a label per leaf.
        schedule: an optax schedule (or float) for the head's learning rate.
    """

    def adam(lr):
        return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)

    body = (lambda step: schedule(step) * body_lr_scale) if callable(schedule) else (
        schedule * body_lr_scale)
    return optax.multi_transform(
        {"head": adam(schedule), "body": adam(body), "frozen": optax.set_to_zero()},
        params_labels)


def schedule_for(config, steps_per_epoch: int):
    """The head's learning-rate schedule of a :class:`~featsim.train.TrainConfig`."""
    total = config.epochs * steps_per_epoch
    lr = config.learning_rate
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total))
    else:
        main = optax.piecewise_constant_schedule(lr, {int(total * 0.5): 0.1,
                                                      int(total * 0.75): 0.1})
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
