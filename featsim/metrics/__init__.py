"""Similarity metrics between feature sets: pure functions on arrays.

Modules: ``distance`` (Gu & Lee's D, within-domain baselines, energy distance), ``frechet``
(FID: FeatureStats, Frechet distance), ``mmd`` (KID), ``cka`` (linear, RBF, minibatch and
layer-by-layer CKA), ``stats`` (bootstrap confidence intervals, permutation tests), ``resample``
(weighted resampling engine: the report's intervals, FID_infinity), ``paired`` (the same
engine across representations of the same images: paired bootstrap, swap and energy tests),
``options`` (``StatOptions``, the statistics options of every comparison). The FID and
KID modules are not called ``fid``/``kid`` so that the functions of those names can be
re-exported here without shadowing their modules.
"""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim.metrics.cka import CKAMatrix as CKAMatrix
from featsim.metrics.cka import MinibatchCKA as MinibatchCKA
from featsim.metrics.cka import cka_matrix as cka_matrix
from featsim.metrics.cka import linear_cka as linear_cka
from featsim.metrics.cka import minibatch_cka as minibatch_cka
from featsim.metrics.cka import rbf_cka as rbf_cka
from featsim.metrics.distance import METRICS as METRICS
from featsim.metrics.distance import DistanceSummary as DistanceSummary
from featsim.metrics.distance import average_distance as average_distance
from featsim.metrics.distance import distance_summary as distance_summary
from featsim.metrics.distance import energy_distance as energy_distance
from featsim.metrics.distance import within_distance as within_distance
from featsim.metrics.frechet import FeatureStats as FeatureStats
from featsim.metrics.frechet import FIDRankWarning as FIDRankWarning
from featsim.metrics.frechet import FIDResult as FIDResult
from featsim.metrics.frechet import fid as fid
from featsim.metrics.frechet import fid_details as fid_details
from featsim.metrics.frechet import frechet_distance as frechet_distance
from featsim.metrics.mmd import KIDResult as KIDResult
from featsim.metrics.mmd import kid as kid
from featsim.metrics.mmd import polynomial_mmd2 as polynomial_mmd2
from featsim.metrics.options import StatOptions as StatOptions
from featsim.metrics.resample import FIDInfinity as FIDInfinity
from featsim.metrics.resample import IntervalEstimate as IntervalEstimate
from featsim.metrics.resample import TwoSampleResampler as TwoSampleResampler
from featsim.metrics.resample import fid_infinity as fid_infinity
from featsim.metrics.resample import resampled_intervals as resampled_intervals
from featsim.metrics.stats import BootstrapResult as BootstrapResult
from featsim.metrics.stats import PermutationResult as PermutationResult
from featsim.metrics.stats import bootstrap_ci as bootstrap_ci
from featsim.metrics.stats import permutation_test as permutation_test

__all__ = [
    "METRICS",
    "BootstrapResult",
    "CKAMatrix",
    "DistanceSummary",
    "FIDInfinity",
    "FIDRankWarning",
    "FIDResult",
    "FeatureStats",
    "IntervalEstimate",
    "KIDResult",
    "MinibatchCKA",
    "PermutationResult",
    "StatOptions",
    "TwoSampleResampler",
    "average_distance",
    "bootstrap_ci",
    "cka_matrix",
    "distance_summary",
    "energy_distance",
    "fid",
    "fid_details",
    "fid_infinity",
    "frechet_distance",
    "kid",
    "linear_cka",
    "minibatch_cka",
    "permutation_test",
    "polynomial_mmd2",
    "rbf_cka",
    "resampled_intervals",
    "within_distance",
]
