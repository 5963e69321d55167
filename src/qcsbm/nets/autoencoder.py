"""A one-layer autoencoder score field s(x) = R phi(W^T x + b) + c with untied R and W.

Symbols (d: input dimension, h: hidden units):

    W (d, h)   encoder weights, column k is w_k
    b (h,)     encoder bias
    R (d, h)   decoder weights, column k is r_k
    c (d,)     decoder bias
    phi        Swish, phi(z) = z sigmoid(beta z), with one learnable beta per hidden unit

Its Jacobian is J(x) = R diag(phi'(W^T x + b)) W^T.
"""

from __future__ import annotations

import torch
from torch import nn

from qcsbm.errors import UsageError


class Swish(nn.Module):
    """Swish, z sigmoid(beta z), with a learnable beta per feature (initialized to 1)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(self.beta * z)


class OneLayerAutoencoder(nn.Module):
    """The score field s(x) = R phi(W^T x + b) + c for points x of shape (B, d).

    Args:
        dim: input dimension d.
        hidden: hidden units h.
        init_range: R, W, b and c start uniform in [-init_range, init_range].
        generator: the source of the initial weights, for reproducible runs.
    """

    def __init__(self, dim: int = 2, hidden: int = 2, *, init_range: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"invalid {name} {value!r}; expected an integer >= 1")
        if not init_range > 0:
            raise UsageError(f"invalid init_range {init_range!r}; expected a number > 0")

        def uniform(*shape):
            values = torch.rand(shape, generator=generator) * 2 - 1
            return nn.Parameter(init_range * values)

        self.W = uniform(dim, hidden)
        self.b = uniform(hidden)
        self.R = uniform(dim, hidden)
        self.c = uniform(dim)
        self.phi = Swish(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.phi(x @ self.W + self.b) @ self.R.T + self.c


def unit_asymmetry(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Return sqrt(sum_k 1/2 ||r_k w_k^T - w_k r_k^T||_F^2) for R, W of shape (d, h).

    Zero exactly when every decoder column r_k is parallel to its encoder column w_k (or
    one of them is zero), the structure that makes J symmetric for every x. In 2-D each
    term is the cross product r_k x w_k, so with h = 1 this is |r_0 w_1 - r_1 w_0|.
    """
    # The (h, d, d) antisymmetric matrices themselves: Lagrange's identity
    # |r|^2 |w|^2 - (r . w)^2 loses half the digits when r_k is nearly parallel to w_k.
    outer = torch.einsum("ik,jk->kij", R, W)
    return (0.5 * (outer - outer.transpose(1, 2)).pow(2).sum()).sqrt()


def summed_asymmetry(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Return ||R W^T - W R^T||_F / sqrt(2): the antisymmetric part of J where phi' = 1.

    In 2-D this is |(R W^T)_{01} - (R W^T)_{10}|. Unlike `unit_asymmetry`, the hidden units'
    terms can cancel, so zero here does not make J symmetric at every x.
    """
    product = R @ W.T
    return (product - product.T).norm() / 2**0.5
