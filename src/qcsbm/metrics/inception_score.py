"""Inception Score from classifier logits.

From Salimans et al., "Improved Techniques for Training GANs" (NeurIPS 2016):

    IS = exp(E_x KL(p(y | x) || p(y))),   p(y) = E_x p(y | x),

computed separately on `num_splits` consecutive splits of the samples. The result is the mean
and standard deviation over splits. torch-fidelity 0.4.0 uses 10 splits too, but shuffles the
samples with a fixed seed before splitting.
IS lies in [1, C] for C classes: 1 when every p(y | x) equals p(y), C when the predictions are
one-hot and spread evenly over all classes.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

from qcsbm.errors import UsageError
from qcsbm.metrics._arrays import as_matrix, check_int_at_least


def inception_score(logits, *, num_splits: int = 10) -> tuple[float, float]:
    """Return the mean and standard deviation of the Inception Score over splits.

    Args:
        logits: unnormalized class scores (N, C) with N >= num_splits. For published
            numbers these are Inception-v3's 1008 logits without the final bias.
        num_splits: number of consecutive splits of the N samples.
    """
    logits = as_matrix("logits", logits)
    check_int_at_least("num_splits", num_splits, 1)
    num_samples = logits.shape[0]
    if num_samples < num_splits:
        raise UsageError(
            f"Inception Score with num_splits {num_splits} needs at least that many samples, "
            f"got {num_samples}; pass more samples or fewer splits")

    log_p = log_softmax(logits, axis=1)
    scores = []
    for split in np.array_split(log_p, num_splits):
        # log p(y) over the split, as a log-mean-exp so that tiny probabilities stay finite.
        log_marginal = logsumexp(split, axis=0) - np.log(split.shape[0])
        kl = (np.exp(split) * (split - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
