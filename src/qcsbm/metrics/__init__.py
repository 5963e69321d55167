"""Sample-quality metrics: FID, Inception Score, KID and precision / recall / density / coverage.

The statistics work on any feature arrays. Inception-v3 features for reportable numbers come
from `InceptionV3Features`, which needs torch-fidelity and its weights file. Importing this
package imports neither.
"""

from qcsbm.metrics.fid import feature_statistics, frechet_distance
from qcsbm.metrics.inception import (InceptionV3Features, extract_features, images_to_tensor,
                                     inception_weights_path)
from qcsbm.metrics.inception_score import inception_score
from qcsbm.metrics.kid import kernel_inception_distance
from qcsbm.metrics.prdc import prdc
from qcsbm.metrics.reference import ReferenceStats, reference_stats
from qcsbm.metrics.sample_quality import compute_sample_quality

__all__ = [
    "InceptionV3Features",
    "ReferenceStats",
    "compute_sample_quality",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "images_to_tensor",
    "inception_score",
    "inception_weights_path",
    "kernel_inception_distance",
    "prdc",
    "reference_stats",
]
