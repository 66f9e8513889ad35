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
from featsim._lazy import lazy_exports

# name -> module under featsim.metrics. Importing this package is cheap: each name loads its
# module (and JAX) on first use (PEP 562), so `featsim --help` and argument errors are instant.
_EXPORTS = {
    "BootstrapResult": "stats",
    "CKAMatrix": "cka",
    "DistanceSummary": "distance",
    "FIDInfinity": "resample",
    "FIDRankWarning": "frechet",
    "FIDResult": "frechet",
    "FeatureStats": "frechet",
    "IntervalEstimate": "resample",
    "KIDResult": "mmd",
    "METRICS": "distance",
    "MinibatchCKA": "cka",
    "PermutationResult": "stats",
    "StatOptions": "options",
    "TwoSampleResampler": "resample",
    "average_distance": "distance",
    "bootstrap_ci": "stats",
    "cka_matrix": "cka",
    "distance_summary": "distance",
    "energy_distance": "distance",
    "fid": "frechet",
    "fid_details": "frechet",
    "fid_infinity": "resample",
    "frechet_distance": "frechet",
    "kid": "mmd",
    "linear_cka": "cka",
    "minibatch_cka": "cka",
    "permutation_test": "stats",
    "polynomial_mmd2": "mmd",
    "rbf_cka": "cka",
    "resampled_intervals": "resample",
    "within_distance": "distance",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
