"""Properties of a learned score field across noise levels: Asym, NAsym and the score error.

Each function evaluates a score model on x_t = mean(t) x_0 + std(t) z at a grid of times and
returns one value per time, the mean over the points. The same perturbed points (same z) serve
every time, so that levels differ only by the noise scale.
"""

from __future__ import annotations

import dataclasses

import torch

from qcsbm import jacobian
from qcsbm.errors import UsageError
from qcsbm.sde import SDE


def noise_level_times(sde: SDE, num_levels: int, *, dtype=torch.float64) -> torch.Tensor:
    """Return `num_levels` evenly spaced times from t_min to 1.

    For a VE SDE sigma(t) is exponential in t, so these levels are geometric in sigma.
    """
    if num_levels < 1:
        raise UsageError(f"invalid num_levels {num_levels!r}; expected an integer >= 1")
    return torch.linspace(sde.t_min, sde.t_max, num_levels, dtype=dtype)


@dataclasses.dataclass
class FieldLevels:
    """Per-level means over the points; `std` is the marginal std at each level."""

    times: list
    std: list
    asym: list
    nasym: list


def asymmetry_by_level(score_fn, sde: SDE, x0: torch.Tensor, times: torch.Tensor, *,
                       method: str = "exact", num_probes: int = 1,
                       generator: torch.Generator | None = None,
                       batch_size: int = 4096) -> FieldLevels:
    """Return the mean Asym and NAsym of score_fn at each time, on perturbed copies of x0."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    asym_means, nasym_means, stds = [], [], []
    for t_value in times.tolist():
        asym_sum, nasym_sum = 0.0, 0.0
        for start in range(0, x0.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            t = torch.full((x0[rows].shape[0],), t_value, dtype=x0.dtype, device=x0.device)
            x_t = sde.perturb(x0[rows], t, noise[rows])
            with torch.no_grad():
                asym, tr_jjt = jacobian.asymmetry_and_trace(
                    lambda x, t=t: score_fn(x, t), x_t, method=method, num_probes=num_probes,
                    probe="rademacher", generator=generator, jvp="auto", create_graph=False)
            asym_sum += float(asym.sum())
            nasym_sum += float(jacobian.nasym_from_traces(asym, tr_jjt).sum())

        asym_means.append(asym_sum / x0.shape[0])
        nasym_means.append(nasym_sum / x0.shape[0])
        stds.append(float(sde.marginal_std(torch.tensor([t_value], dtype=torch.float64))))
    return FieldLevels(times=times.tolist(), std=stds, asym=asym_means, nasym=nasym_means)


def score_error_by_level(score_fn, true_score_fn, sde: SDE, x0: torch.Tensor,
                         times: torch.Tensor, *, generator: torch.Generator | None = None,
                         batch_size: int = 4096) -> list:
    """Return the mean of 1/2 ||s(x_t, t) - s*(x_t, t)||^2 at each time.

    `true_score_fn(x, t)` is the exact score of the perturbed data distribution.
    """
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    errors = []
    for t_value in times.tolist():
        total = 0.0
        for start in range(0, x0.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            t = torch.full((x0[rows].shape[0],), t_value, dtype=x0.dtype, device=x0.device)
            x_t = sde.perturb(x0[rows], t, noise[rows])
            with torch.no_grad():
                difference = score_fn(x_t, t) - true_score_fn(x_t, t)
            total += float(0.5 * difference.reshape(difference.shape[0], -1).pow(2).sum())
        errors.append(total / x0.shape[0])
    return errors
