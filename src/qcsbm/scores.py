"""Score parameterizations: any network `net(x, cond)` becomes a score function `score(x, t)`.

* `UnconstrainedScore` (USBM): the score is the network's output, scaled per `output`:
    "score"     s = net(x, c)                  the network already outputs the score
                                               (NCSN++ with scale_by_sigma divides by sigma);
    "noise"     s = -net(x, c) / std(t)        the network predicts the noise z in
                                               x_t = mean x_0 + std z (DDPM++ on VP / sub-VP);
    "residual"  s = (x - net(x, c)) / std(t)   the 2-D network's head.
* `EnergyScore` (CSBM): the score is -grad_x E(x, t) of a scalar energy per sample:
    "residual"  E = ||x - net(x, c)||^2 / (2 std(t))   for low-dimensional data;
    "norm"      E = 1/2 ||net(x, c)||^2 / std(t)         as used with NCSN++.
  Its Jacobian is the negative Hessian of E and so symmetric by construction.

A quasi-conservative model (QCSBM) is an `UnconstrainedScore` trained with the asymmetry
penalty of `qcsbm.losses`; it needs no class of its own.

The conditioning value c = sde.condition(t) is the same for training, sampling and the
likelihood (see `qcsbm.sde`).
"""

from __future__ import annotations

import torch
from torch import nn

from qcsbm.errors import check_choice
from qcsbm.sde import SDE, broadcast_to

UNCONSTRAINED_OUTPUTS = ("score", "noise", "residual")
ENERGY_FORMS = ("residual", "norm")


def _flat_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).pow(2).sum(dim=1)


class UnconstrainedScore(nn.Module):
    """A USBM score s(x, t) read directly off a network's output."""

    is_energy = False

    def __init__(self, net: nn.Module, sde: SDE, output: str = "score"):
        super().__init__()
        check_choice("output", output, UNCONSTRAINED_OUTPUTS)
        self.net = net
        self.sde = sde
        self.output = output

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, self.sde.condition(t))
        if self.output == "score":
            return out

        std = broadcast_to(self.sde.marginal_std(t), x)
        if self.output == "noise":
            return -out / std
        return (x - out) / std


class EnergyScore(nn.Module):
    """A CSBM score s(x, t) = -grad_x E(x, t) of a scalar energy built from a network.

    The gradient keeps its graph (`create_graph=True`) whenever the caller has gradients
    enabled, as training and Jacobian computations need. Under `torch.no_grad()` (sampling,
    evaluation) it computes the gradient without keeping a graph and returns a detached
    tensor. Under `torch.inference_mode()` it raises RuntimeError, because autograd is off
    there. The caller's `x` is never modified.
    """

    is_energy = True

    def __init__(self, net: nn.Module, sde: SDE, form: str = "residual"):
        super().__init__()
        check_choice("form", form, ENERGY_FORMS)
        self.net = net
        self.sde = sde
        self.form = form

    def energy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return E(x, t) per sample, shape (B,)."""
        out = self.net(x, self.sde.condition(t))
        std = self.sde.marginal_std(t)
        if self.form == "residual":
            return _flat_sq_norm(x - out) / (2 * std)
        return 0.5 * _flat_sq_norm(out) / std

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Inference mode disables autograd even inside enable_grad, so the gradient cannot exist.
        if torch.is_inference_mode_enabled():
            raise RuntimeError("EnergyScore needs autograd to compute -grad_x E, which "
                               "torch.inference_mode() disables. Use torch.no_grad() instead")
        keep_graph = torch.is_grad_enabled()

        # Differentiate with respect to the caller's x when it is already part of a graph, so
        # that the score stays differentiable in x. Otherwise use a detached leaf copy.
        x_in = x if (keep_graph and x.requires_grad) else x.detach().requires_grad_(True)

        with torch.enable_grad():
            energy = self.energy(x_in, t)
            (grad,) = torch.autograd.grad(energy.sum(), x_in, create_graph=keep_graph)
        return -grad
