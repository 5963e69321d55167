"""The noise-conditional MLP of the 2-D experiments of Chao et al. (ICML 2023).

Layer widths, activations and the way sigma enters follow the authors' network
(chen-hao-chao/qcsbm, 2d_examples/models/simple_score_fn.py, with its default activations):

    input branch   x (2) -> 64 -> 128 -> 256          Linear, Swish, Linear, Swish, Linear
    noise branch   sigma (1) -> 1 -> 1 -> 1            Linear, Swish, Linear, Swish, Linear
    head           concat (257) -> Swish -> Linear -> f(x, sigma) (2)

Swish is x * sigmoid(beta x) with one trainable beta per feature, initialised to 1.

The network returns f(x, sigma); `qcsbm.scores` turns it into a score:

    USBM   UnconstrainedScore(ToyScoreNet(), VESDE(0.1, 3.0), output="residual")
           s = (x - f) / sigma
    CSBM   EnergyScore(ToyScoreNet(energy_head=True), VESDE(0.1, 3.0), form="residual")
           E = ||x - elu(f)||^2 / (2 sigma),  s = -grad_x E

In the energy model the authors pass the head's output through an ELU before it enters the
energy; `energy_head=True` does the same. The unconstrained model uses the head as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qcsbm.errors import UsageError


class Swish(nn.Module):
    """x * sigmoid(beta x) with a trainable beta per feature (last dimension), initially 1."""

    def __init__(self, num_features: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class ToyScoreNet(nn.Module):
    """The 2-D network f(x, sigma), called as `net(x, cond)` with cond = sigma.

    Args:
        energy_head: apply an ELU to the output, as the authors' energy model (CSBM) does
            before forming E = ||x - f||^2 / (2 sigma). Leave it off for the unconstrained
            model (USBM, QCSBM).
    """

    def __init__(self, energy_head: bool = False):
        super().__init__()
        self.energy_head = bool(energy_head)
        self.input_branch = nn.Sequential(
            nn.Linear(2, 64), Swish(64),
            nn.Linear(64, 128), Swish(128),
            nn.Linear(128, 256),
        )
        self.noise_branch = nn.Sequential(
            nn.Linear(1, 1), Swish(1),
            nn.Linear(1, 1), Swish(1),
            nn.Linear(1, 1),
        )
        self.head_activation = Swish(256 + 1)
        self.head = nn.Linear(256 + 1, 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return f(x, sigma), shape (B, 2), for x of shape (B, 2) and cond = sigma, shape
        (B,) or a scalar (the VE SDE's `condition(t)`)."""
        if x.dim() != 2 or x.shape[1] != 2:
            raise UsageError(f"invalid x of shape {tuple(x.shape)}; ToyScoreNet expects "
                             "shape (B, 2)")
        sigma = torch.as_tensor(cond, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise UsageError(f"invalid cond of shape {tuple(sigma.shape)}; ToyScoreNet "
                             f"expects sigma as a scalar or shape ({x.shape[0]},)")

        features = torch.cat([self.input_branch(x), self.noise_branch(sigma.unsqueeze(1))],
                             dim=1)
        out = self.head(self.head_activation(features))
        if self.energy_head:
            out = F.elu(out)
        return out

    def extra_repr(self) -> str:
        return f"energy_head={self.energy_head}"
