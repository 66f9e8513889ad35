"""featsim.metrics.StatOptions: validated on construction, in the user's words."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featsim.metrics import StatOptions


@pytest.mark.parametrize("changes, message", [
    (dict(n_bootstrap=-5), r"bootstrap resamples \(--bootstrap\) must be an integer >= 0, "
                           r"got -5"),
    (dict(n_bootstrap=2.5), r"bootstrap resamples .* got 2\.5"),
    (dict(n_permutations=-1), r"permutations \(--permutations\) must be an integer >= 0, got -1"),
    (dict(seed=-1), r"seed \(--seed\) must be an integer >= 0, got -1"),
    (dict(kid_subset_size=1), r"KID subset size \(--kid-subset-size\) must be an integer >= 2, "
                              r"got 1"),
    (dict(kid_subsets=0), r"KID subsets \(--kid-subsets\) must be an integer >= 1, got 0"),
    (dict(confidence=1.0), r"confidence level must lie strictly between 0 and 1, got 1\.0"),
    (dict(confidence=True), r"confidence level .* got True"),
    (dict(ci_method="bootstrap"), r"interval method \(--ci-method\) must be one of basic, "
                                  r"percentile, BCa, got 'bootstrap'"),
    (dict(metric="manhattan"), r"metric \(--metric\) must be one of .*euclidean.* got "
                               r"'manhattan'"),
    (dict(n_bootstrap=True), r"bootstrap resamples .* got True"),
])
def test_bad_values_name_the_option_value_and_range(changes, message):
    with pytest.raises(ValueError, match=message):
        StatOptions(**changes)


def test_canonical_values_and_frozen():
    o = StatOptions(n_bootstrap=np.int64(20), ci_method="bca", confidence=np.float32(0.5))
    assert o.n_bootstrap == 20 and type(o.n_bootstrap) is int
    assert o.ci_method == "BCa" and type(o.confidence) is float
    assert o.replace(seed=3).seed == 3 and o.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.seed = 1
    with pytest.raises(ValueError, match="seed"):
        o.replace(seed=-2)
    assert StatOptions().to_dict() == {
        "metric": "euclidean", "n_bootstrap": 0, "n_permutations": 0, "confidence": 0.95,
        "ci_method": "basic", "kid_subset_size": 1000, "kid_subsets": 100, "seed": 0}
