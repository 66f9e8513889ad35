"""Pretrained vs fine-tuned (and a BN-adapted control): the same images, what changed, how sure.

Modules: ``finetuned`` (load the trainer's fine-tuned checkpoint), ``change`` (every statistic's
change between feature arrays, paired intervals and tests from
:mod:`featsim.metrics.paired`), ``networks`` (backbones in, comparison and layer CKA out),
``result`` (the result types and their JSON and tables), ``verdict`` (the verdict in words).
The CKA heatmap is :func:`featsim.plots.plot_cka`.
"""

from featsim.comparison.change import PAIRED_DEFAULTS as PAIRED_DEFAULTS
from featsim.comparison.change import feature_change as feature_change
from featsim.comparison.finetuned import MODEL_FILENAME as MODEL_FILENAME
from featsim.comparison.finetuned import load_finetuned as load_finetuned
from featsim.comparison.networks import compare_backbones as compare_backbones
from featsim.comparison.networks import depth_order as depth_order
from featsim.comparison.result import LABELS as LABELS
from featsim.comparison.result import PART_LABELS as PART_LABELS
from featsim.comparison.result import PARTS as PARTS
from featsim.comparison.result import SCALE_FREE as SCALE_FREE
from featsim.comparison.result import STATISTICS as STATISTICS
from featsim.comparison.result import ComparisonResult as ComparisonResult
from featsim.comparison.result import Delta as Delta
from featsim.comparison.result import FeatureChange as FeatureChange

__all__ = [
    "LABELS",
    "MODEL_FILENAME",
    "PAIRED_DEFAULTS",
    "PARTS",
    "PART_LABELS",
    "SCALE_FREE",
    "STATISTICS",
    "ComparisonResult",
    "Delta",
    "FeatureChange",
    "compare_backbones",
    "depth_order",
    "feature_change",
    "load_finetuned",
]
