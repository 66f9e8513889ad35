"""The statistics options of every comparison, declared once.

``featsim distance``, ``featsim compare``, :func:`featsim.report.similarity_report`,
:func:`featsim.pipeline.feature_distance` and :func:`featsim.comparison.compare_backbones`
take one :class:`StatOptions`. It validates itself on construction, so a caller (the CLI)
builds it before any extraction and a bad value fails at once, in the words the user typed.
"""

from __future__ import annotations

import dataclasses
import numbers

__all__ = ["CI_METHODS", "DEFAULT_STATS", "METRICS", "StatOptions"]

# Pairwise metrics of D and the energy distance (featsim.metrics.distance computes them). This
# module imports neither JAX nor numpy's heavy users, so the CLI can offer these as choices.
METRICS = ("euclidean", "sqeuclidean", "cosine", "cityblock")

# Interval kinds of the bootstrap (featsim.metrics.resample); paired changes take the first two.
CI_METHODS = ("basic", "percentile", "BCa")


def _integer(value, what: str, low: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class StatOptions:
    """How similarity statistics are computed, resampled and tested.

    Attributes:
      metric: pairwise metric of D and the energy distance (``featsim.metrics.METRICS``).
      n_bootstrap: bootstrap resamples for the intervals, >= 0 (0: no intervals).
      n_permutations: permutations for the tests, >= 0 (0: no p-values).
      confidence: level of the intervals, in (0, 1).
      ci_method: ``"basic"``, ``"percentile"`` or ``"BCa"`` (any case; stored canonical).
      kid_subset_size: rows per KID subset, >= 2 (clamped to the smaller set).
      kid_subsets: KID subsets, >= 1.
      seed: seed of every random choice, an integer >= 0.

    Raises:
      ValueError: on construction, naming the option, the value and the allowed range
        (``"bootstrap resamples (--bootstrap) must be an integer >= 0, got -5"``).

    Example:
      >>> StatOptions(n_bootstrap=200).n_permutations
      0
    """

    metric: str = "euclidean"
    n_bootstrap: int = 0
    n_permutations: int = 0
    confidence: float = 0.95
    ci_method: str = "basic"
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric (--metric) must be one of {', '.join(METRICS)}, got "
                             f"{self.metric!r}")
        checked = {
            "n_bootstrap": _integer(self.n_bootstrap, "bootstrap resamples (--bootstrap)", 0),
            "n_permutations": _integer(self.n_permutations,
                                       "permutations (--permutations)", 0),
            "kid_subset_size": _integer(self.kid_subset_size,
                                        "KID subset size (--kid-subset-size)", 2),
            "kid_subsets": _integer(self.kid_subsets, "KID subsets (--kid-subsets)", 1),
            "seed": _integer(self.seed, "seed (--seed)", 0),
        }
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, numbers.Real) \
                or not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence level must lie strictly between 0 and 1, got "
                             f"{self.confidence!r}")
        checked["confidence"] = float(self.confidence)
        matches = [m for m in CI_METHODS if str(self.ci_method).lower() == m.lower()]
        if not matches:
            raise ValueError(f"interval method (--ci-method) must be one of "
                             f"{', '.join(CI_METHODS)}, got {self.ci_method!r}")
        checked["ci_method"] = matches[0]
        for name, value in checked.items():  # canonical types: numpy ints become ints
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> StatOptions:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Point values only: no bootstrap, no permutations (similarity_report's default).
DEFAULT_STATS = StatOptions()
