"""Stop-when criteria on validation metrics: the value behind ``TrainConfig.stop_when``.

El Azhari ("Transfer learning for Covid-19 detection in medical images", sec. 4) stops
training with a Keras callback "when the validation accuracy reaches 0.89 and the validation
loss is below 0.3". That is::

    StopWhen.parse("val_accuracy>=0.89,val_loss<0.3")
    # == StopWhen(((("val_accuracy", ">=", 0.89), ("val_loss", "<", 0.3)))

Training stops after the first epoch whose validation metrics satisfy **every** condition;
the model of that epoch is the run's final model (unless ``early_stopping_patience`` also
selects the best-validation-loss model). A NaN metric satisfies no condition. The value is
plain data, ``((metric, op, threshold), ...)``, so it round-trips through ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from collections.abc import Iterable, Mapping

from featsim.train.metric_keys import BINARY_METRIC_KEYS, MULTICLASS_METRIC_KEYS

__all__ = ["OPERATORS", "STOP_METRICS", "StopWhen"]

#: Comparison operators a condition may use.
OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}

#: Metric names a condition may use: ``val_`` + a classification metric or the loss.
STOP_METRICS = tuple(
    f"val_{k}" for k in dict.fromkeys(("loss", *BINARY_METRIC_KEYS, *MULTICLASS_METRIC_KEYS)))

_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")

Condition = tuple[str, str, float]


def _check_condition(condition) -> Condition:
    if isinstance(condition, str) or not isinstance(condition, Iterable):
        raise ValueError(
            f"a stop condition is (metric, operator, threshold), got {condition!r}")
    parts = tuple(condition)
    if len(parts) != 3:
        raise ValueError(
            f"a stop condition is (metric, operator, threshold), got {len(parts)} items: "
            f"{condition!r}")
    metric, op, threshold = parts
    if metric not in STOP_METRICS:
        hint = (" (the test set is never used for stopping or model selection)"
                if isinstance(metric, str) and metric.startswith("test_") else "")
        raise ValueError(
            f"unknown stop metric {metric!r}{hint}; expected one of {', '.join(STOP_METRICS)}")
    if op not in OPERATORS:
        raise ValueError(
            f"unknown stop operator {op!r} in {condition!r}; expected one of "
            f"{', '.join(OPERATORS)}")
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
            or not math.isfinite(threshold)):
        raise ValueError(f"stop threshold must be a finite number, got {threshold!r} in "
                         f"{condition!r}")
    return metric, op, float(threshold)


@dataclasses.dataclass(frozen=True)
class StopWhen:
    """Stop training after the first epoch where all ``conditions`` hold.

    Attributes:
        conditions: non-empty tuple of ``(metric, operator, threshold)``; ``metric`` one of
            :data:`STOP_METRICS`, ``operator`` one of :data:`OPERATORS`. Lists (from JSON)
            are accepted and stored as tuples.

    Raises:
        ValueError: empty conditions, an unknown metric or operator, a non-finite threshold.

    Example:
        >>> rule = StopWhen.parse("val_accuracy>=0.89,val_loss<0.3")
        >>> rule.holds({"val_accuracy": 0.9, "val_loss": 0.25})
        True
        >>> rule.holds({"val_accuracy": 0.9, "val_loss": 0.31})
        False
    """

    conditions: tuple[Condition, ...]

    def __post_init__(self):
        if isinstance(self.conditions, str) or not isinstance(self.conditions, Iterable):
            raise ValueError(
                f"conditions must be a sequence of (metric, operator, threshold), got "
                f"{self.conditions!r}; for a string use StopWhen.parse")
        checked = tuple(_check_condition(c) for c in self.conditions)
        if not checked:
            raise ValueError("StopWhen needs at least one condition")
        object.__setattr__(self, "conditions", checked)

    @classmethod
    def parse(cls, text: str) -> StopWhen:
        """From ``"metric OP threshold[,metric OP threshold...]"``, e.g. the CLI's
        ``--stop-when "val_accuracy>=0.89,val_loss<0.3"``."""
        conditions = []
        for part in text.split(","):
            match = _CONDITION.match(part)
            if match is None:
                raise ValueError(
                    f"cannot parse stop condition {part!r} in {text!r}; expected "
                    f"METRIC OP NUMBER with OP one of {', '.join(OPERATORS)}, e.g. "
                    "val_accuracy>=0.89,val_loss<0.3")
            metric, op, number = match.groups()
            try:
                threshold = float(number)
            except ValueError:
                raise ValueError(
                    f"stop threshold {number!r} in {part!r} is not a number") from None
            conditions.append((metric, op, threshold))
        return cls(tuple(conditions))

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names the conditions read, in order, without repeats."""
        return tuple(dict.fromkeys(m for m, _, _ in self.conditions))

    def check_available(self, available: Iterable[str]) -> None:
        """Raises ValueError unless every metric read is in ``available`` (e.g. a
        multi-class metric such as ``val_f1_macro`` on a binary problem)."""
        available = set(available)
        missing = [m for m in self.metrics if m not in available]
        if missing:
            raise ValueError(
                f"stop_when reads {missing}, which this run does not compute; available: "
                f"{', '.join(sorted(available))}")

    def holds(self, metrics: Mapping[str, float]) -> bool:
        """Whether every condition holds on ``metrics`` (NaN satisfies none).

        Raises:
            KeyError: a metric read is missing from ``metrics``.
        """
        return all(OPERATORS[op](float(metrics[m]), t) for m, op, t in self.conditions)

    def describe(self, metrics: Mapping[str, float] | None = None) -> str:
        """``"val_accuracy>=0.89, val_loss<0.3"``, with the observed values when given."""
        parts = []
        for m, op, t in self.conditions:
            seen = f" ({float(metrics[m]):.6g})" if metrics is not None else ""
            parts.append(f"{m}{op}{t:g}{seen}")
        return ", ".join(parts)

    def to_config(self) -> tuple[Condition, ...]:
        """The plain value stored in :class:`~featsim.train.TrainConfig`."""
        return self.conditions
