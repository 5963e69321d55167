"""All Jacobian math: exact Jacobians, Hutchinson probes, asymmetry, NAsym and divergence.

For a function s mapping a batch x of shape (B, ...) to the same shape, J is the per-sample
Jacobian ds/dx with x flattened to d dimensions. The quasi-conservative penalty of
Chao et al., "On Investigating the Conservative Property of Score-Based Generative Models"
(ICML 2023), Section 4, is

    asymmetry(J) = tr(J J^T) - tr(J J) = 1/2 ||J - J^T||_F^2 >= 0,

zero exactly when J is symmetric (a conservative field). Estimators:

    "exact"        1/2 ||J - J^T||_F^2 from the full Jacobian (d VJPs; meant for small d).
    "hutchinson"   the paper's form ||J^T v||^2 - v^T J J v with probes v, E[v v^T] = I.
                   It can be negative for one probe.
    "nonnegative"  1/2 ||(J - J^T) v||^2, one Jacobian-vector product and one vector-Jacobian
                   product per probe. Same expectation, never negative, one backward pass.

NAsym = asymmetry / (2 tr(J J^T)) in [0, 1]: the squared size of J's antisymmetric part
relative to J's (0 for a symmetric J, 1 for an antisymmetric one). It is defined as 0 where
J = 0.

All functions keep the autograd graph (so a penalty can be trained through) when gradients
are enabled at the call, and return detached values under `torch.no_grad()`.
"""

from __future__ import annotations

import logging

import torch

from qcsbm.errors import UsageError, check_choice

METHODS = ("exact", "hutchinson", "nonnegative")
PROBES = ("rademacher", "gaussian")
JVP_MODES = ("auto", "forward", "double-backward")

logger = logging.getLogger(__name__)


# --- probes and products ---------------------------------------------------------------------


def sample_probes(x: torch.Tensor, num_probes: int, probe: str = "rademacher",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num_probes` probe vectors per sample, shape (K, *x.shape), with E[v v^T] = I."""
    check_choice("probe", probe, PROBES)
    if num_probes < 1:
        raise UsageError(f"invalid num_probes {num_probes!r}; expected an integer >= 1")

    device = generator.device if generator is not None else x.device
    shape = (num_probes, *x.shape)
    if probe == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    return v.to(x.device)


def _per_sample_sq_norm(a: torch.Tensor, batch_dims: int) -> torch.Tensor:
    return a.flatten(start_dim=batch_dims).pow(2).sum(dim=-1)


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor, batch_dims: int) -> torch.Tensor:
    return (a * b).flatten(start_dim=batch_dims).sum(dim=-1)


# Up to this many products run as a loop of backward passes; more run as one vmapped pass.
LOOP_MAX_PRODUCTS = 16


def batched_vjp(s: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor,
                create_graph: bool, *, vectorize: bool | None = None) -> torch.Tensor:
    """Return J^T u for each of the K cotangents u (shape (K, *s.shape)).

    The forward pass that produced s is shared by all K products. `vectorize=False` runs
    them as K backward passes through that one graph, `vectorize=True` as one vmapped pass
    (`is_grads_batched`). The default loops for K <= LOOP_MAX_PRODUCTS (16, the paper's
    largest K): on the CPU the vmapped pass took 1.6x the loop's step time for K = 16 on a
    small conv net (benchmarks/core_step.py). Larger K vectorize, as a loop of thousands of
    graphs costs far more time and memory. The vmapped pass falls back to the loop when an
    operator has no batching rule.
    """
    if vectorize is None:
        vectorize = cotangents.shape[0] > LOOP_MAX_PRODUCTS
    if vectorize and cotangents.shape[0] > 1:
        try:
            (out,) = torch.autograd.grad(s, x, cotangents, retain_graph=True,
                                         create_graph=create_graph, is_grads_batched=True)
            return out
        except RuntimeError as error:
            logger.debug("vmapped VJP failed (%s); using a loop", error)
    rows = [torch.autograd.grad(s, x, u, retain_graph=True, create_graph=create_graph)[0]
            for u in cotangents]
    return torch.stack(rows)


def batched_jvp(fn, x: torch.Tensor, tangents: torch.Tensor, *, mode: str = "forward",
                create_graph: bool = True) -> torch.Tensor:
    """Return J v for each of the K tangents v (shape (K, *x.shape)).

    mode "forward" uses forward-mode AD vectorised over the probes with `torch.func`, so the
    primal forward pass runs once; it needs a network made of ordinary differentiable ops.
    mode "double-backward" uses J v = d/da [(J^T a) . v] through two reverse passes and
    works for any function reverse mode can differentiate twice (for example an energy
    model's score, which itself calls `torch.autograd.grad`).
    """
    check_choice("jvp mode", mode, JVP_MODES[1:])
    if mode == "forward":
        def jvp_one(v):
            return torch.func.jvp(fn, (x,), (v,))[1]

        try:
            if tangents.shape[0] == 1:
                return jvp_one(tangents[0]).unsqueeze(0)
            return torch.func.vmap(jvp_one, randomness="same")(tangents)
        except RuntimeError as error:
            raise RuntimeError(f"forward-mode JVP failed: {error}. A function that calls "
                               "torch.autograd.grad (an energy score) needs jvp mode "
                               "'double-backward' or 'auto'") from error

    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    s = fn(x_in)
    dummy = torch.zeros_like(s, requires_grad=True)
    (vjp_dummy,) = torch.autograd.grad(s, x_in, dummy, create_graph=True)
    rows = [torch.autograd.grad(vjp_dummy, dummy, v, retain_graph=True,
                                create_graph=create_graph)[0] for v in tangents]
    return torch.stack(rows)


def jvp_products(fn, x: torch.Tensor, tangents: torch.Tensor, *, jvp: str = "auto",
                 create_graph: bool = True) -> torch.Tensor:
    """Return J v for each tangent, computed in the mode that `jvp` selects.

    "auto" tries forward mode first and falls back to double backward when the function
    cannot run under `torch.func` (an energy model's score calls `torch.autograd.grad`).
    """
    check_choice("jvp", jvp, JVP_MODES)
    if jvp != "auto":
        return batched_jvp(fn, x, tangents, mode=jvp, create_graph=create_graph)
    if getattr(fn, "is_energy", False):
        return batched_jvp(fn, x, tangents, mode="double-backward", create_graph=create_graph)
    try:
        return batched_jvp(fn, x, tangents, mode="forward", create_graph=create_graph)
    except RuntimeError as error:
        logger.debug("forward-mode JVP failed (%s); using double backward", error)
        return batched_jvp(fn, x, tangents, mode="double-backward", create_graph=create_graph)


# --- exact Jacobian --------------------------------------------------------------------------


def jacobian_from_output(s: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Return the per-sample Jacobian (B, d, d) of an output s = fn(x) already computed."""
    batch = x.shape[0]
    d = x[0].numel()
    eye = torch.eye(d, device=x.device, dtype=x.dtype)
    cotangents = eye.unsqueeze(1).expand(d, batch, d).reshape(d, *s.shape)

    # Row i of J for every sample at once: the VJP with the i-th basis vector.
    rows = batched_vjp(s, x, cotangents, create_graph)
    return rows.reshape(d, batch, d).transpose(0, 1)


def jacobian(fn, x: torch.Tensor, *, create_graph: bool | None = None) -> torch.Tensor:
    """Return the per-sample Jacobian of fn at x, shape (B, d, d), d = x[0].numel()."""
    keep = torch.is_grad_enabled() if create_graph is None else create_graph
    with torch.enable_grad():
        x_in = _input_leaf(x, keep)
        s = fn(x_in)
        jac = jacobian_from_output(s, x_in, keep)
    return jac if keep else jac.detach()


def _input_leaf(x: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    """Use the caller's x when it is part of a graph we must keep, else a detached leaf."""
    if keep_graph and x.requires_grad:
        return x
    return x.detach().requires_grad_(True)


# --- traces and asymmetry ------------------------------------------------------------------


def traces_from_output(fn, s: torch.Tensor, x: torch.Tensor, *, method: str = "exact",
                       num_probes: int = 1, probe: str = "rademacher",
                       generator: torch.Generator | None = None, jvp: str = "auto",
                       create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample (asymmetry, tr(J J^T)) for s = fn(x), estimated by `method`.

    `x` must require grad and `s` must have been computed from it, so that the forward pass
    can be shared with another loss term (denoising score matching).
    """
    check_choice("method", method, METHODS)
    if method == "exact":
        jac = jacobian_from_output(s, x, create_graph)
        antisym = jac - jac.transpose(1, 2)
        return 0.5 * antisym.pow(2).sum(dim=(1, 2)), jac.pow(2).sum(dim=(1, 2))

    v = sample_probes(x, num_probes, probe, generator)
    if method == "nonnegative" and jvp != "forward":
        check_choice("jvp", jvp, JVP_MODES)
        return _nonnegative_from_output(s, x, v, create_graph)

    u = batched_vjp(s, x, v, create_graph=True if method == "hutchinson" else create_graph)
    if method == "hutchinson":
        # v^T J J v = (J^T u)^T v with u = J^T v: a second VJP through the first one.
        w = batched_vjp(s, x, u, create_graph)
        tr_jjt = _per_sample_sq_norm(u, 2)
        asym = tr_jjt - _per_sample_dot(w, v, 2)
        return asym.mean(dim=0), tr_jjt.mean(dim=0)

    jv = batched_jvp(fn, x, v, mode="forward", create_graph=create_graph)
    return _nonnegative_terms(jv, u)


def _nonnegative_from_output(s, x, v, create_graph):
    """Return per-sample (asymmetry, tr(J J^T)) of the nonnegative form from s = fn(x) alone.

    Both products come from the forward pass that made s, so one dropout mask serves both.
    Up to LOOP_MAX_PRODUCTS probes: with a_k zero leaves of s's shape, u_k = J^T (v_k + a_k)
    equals J^T v_k in value and d/da_k (u_k . v_k) = J v_k, so one more reverse pass gives
    every J v_k. More probes: J v_k = d/da [(J^T a) . v_k] through one VJP with a dummy
    cotangent a, vmapped over k, as a loop over thousands of graphs is slow and the
    vmapped form of the first way materialises K x K terms.
    """
    if v.shape[0] <= LOOP_MAX_PRODUCTS:
        a = torch.zeros_like(v, requires_grad=True)
        u = batched_vjp(s, x, v + a, create_graph=True, vectorize=False)
        (jv,) = torch.autograd.grad((u * v).sum(), a, retain_graph=True,
                                    create_graph=create_graph)
    else:
        u = batched_vjp(s, x, v, create_graph)
        dummy = torch.zeros_like(s, requires_grad=True)
        (vjp_dummy,) = torch.autograd.grad(s, x, dummy, create_graph=True)
        jv = batched_vjp(vjp_dummy, dummy, v, create_graph)
    if not create_graph:
        u = u.detach()
    return _nonnegative_terms(jv, u)


def _nonnegative_terms(jv, u):
    """Return the probe averages of 1/2 ||(J - J^T) v||^2 and of the tr(J J^T) estimate."""
    asym = 0.5 * _per_sample_sq_norm(jv - u, 2)
    tr_jjt = 0.5 * (_per_sample_sq_norm(jv, 2) + _per_sample_sq_norm(u, 2))
    return asym.mean(dim=0), tr_jjt.mean(dim=0)


def asymmetry_and_trace(fn, x: torch.Tensor, *, method: str = "exact", num_probes: int = 1,
                        probe: str = "rademacher", generator: torch.Generator | None = None,
                        jvp: str = "auto", create_graph: bool | None = None):
    """Return per-sample (asymmetry, tr(J J^T)) from one set of probes.

    Arguments as for `jacobian_asymmetry`; NAsym is `nasym_from_traces` of the pair.
    """
    keep = torch.is_grad_enabled() if create_graph is None else create_graph
    with torch.enable_grad():
        x_in = _input_leaf(x, keep)
        s = fn(x_in)
        asym, tr_jjt = traces_from_output(fn, s, x_in, method=method, num_probes=num_probes,
                                          probe=probe, generator=generator, jvp=jvp,
                                          create_graph=keep)
    if not keep:
        return asym.detach(), tr_jjt.detach()
    return asym, tr_jjt


def jacobian_asymmetry(fn, x: torch.Tensor, *, method: str = "exact", num_probes: int = 1,
                       probe: str = "rademacher", generator: torch.Generator | None = None,
                       jvp: str = "auto", create_graph: bool | None = None) -> torch.Tensor:
    """Return tr(J J^T) - tr(J J) per sample, shape (B,) (an estimate for Hutchinson methods).

    Args:
        fn: maps a batch x of shape (B, ...) to the same shape; J is its per-sample Jacobian.
        x: the batch, any trailing shape.
        method: "exact", "hutchinson" (the paper's form) or "nonnegative".
        num_probes: K probes per sample for the Hutchinson methods, averaged.
        probe: "rademacher" or "gaussian".
        generator: the source of the probes, for reproducible estimates.
        jvp: how "nonnegative" computes J v. "auto" and "double-backward" take two reverse
            passes through the forward pass already done. "forward" runs a second,
            forward-mode pass with `torch.func`; it needs a deterministic network (no
            dropout in train mode) and no autograd calls inside it (not an energy score).
        create_graph: keep the graph for a backward pass; default: whether grad is enabled.
    """
    asym, _ = asymmetry_and_trace(fn, x, method=method, num_probes=num_probes, probe=probe,
                                  generator=generator, jvp=jvp, create_graph=create_graph)
    return asym


def nasym_from_traces(asym: torch.Tensor, tr_jjt: torch.Tensor) -> torch.Tensor:
    """Return NAsym = asym / (2 tr(J J^T)), defined as 0 where tr(J J^T) = 0."""
    safe = torch.where(tr_jjt > 0, tr_jjt, torch.ones_like(tr_jjt))
    return torch.where(tr_jjt > 0, asym / (2 * safe), torch.zeros_like(asym))


def nasym(fn, x: torch.Tensor, *, method: str = "exact", num_probes: int = 1,
          probe: str = "rademacher", generator: torch.Generator | None = None,
          jvp: str = "auto", create_graph: bool | None = None) -> torch.Tensor:
    """Return NAsym = (tr(J J^T) - tr(J J)) / (2 tr(J J^T)) per sample, shape (B,).

    Both traces come from the same probes. For "exact" and "nonnegative" the value lies in
    [0, 1] for every sample; the paper's "hutchinson" form can leave that range for few probes.
    Arguments as for `jacobian_asymmetry`.
    """
    asym, tr_jjt = asymmetry_and_trace(fn, x, method=method, num_probes=num_probes,
                                       probe=probe, generator=generator, jvp=jvp,
                                       create_graph=create_graph)
    return nasym_from_traces(asym, tr_jjt)


# --- divergence ----------------------------------------------------------------------------


def divergence(fn, x: torch.Tensor, *, method: str = "exact", num_probes: int = 1,
               probe: str = "rademacher", generator: torch.Generator | None = None,
               probes: torch.Tensor | None = None,
               create_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (fn(x), tr(J)) per sample: the exact trace or Hutchinson's v^T J v estimate.

    `probes` (shape (K, *x.shape)) fixes the Hutchinson probes, as the likelihood ODE needs
    the same probes at every solver step; otherwise K fresh probes are drawn.
    """
    check_choice("method", method, ("exact", "hutchinson"))
    keep = torch.is_grad_enabled() if create_graph is None else create_graph
    with torch.enable_grad():
        x_in = _input_leaf(x, keep)
        s = fn(x_in)
        if method == "exact":
            jac = jacobian_from_output(s, x_in, keep)
            trace = jac.diagonal(dim1=1, dim2=2).sum(dim=1)
        else:
            v = probes if probes is not None else sample_probes(x, num_probes, probe, generator)
            u = batched_vjp(s, x_in, v, keep)
            trace = _per_sample_dot(u, v, 2).mean(dim=0)
    if not keep:
        return s.detach(), trace.detach()
    return s, trace


# --- the paper's two-stage backward ---------------------------------------------------------


def hutchinson_two_stage_backward(s: torch.Tensor, x: torch.Tensor, probes: torch.Tensor,
                                  weight: torch.Tensor, other_loss: torch.Tensor) -> torch.Tensor:
    """Backpropagate other_loss + sum_b weight_b * hutchinson_b, the paper's way, in two passes.

    The paper's estimate per sample is ||u||^2 - v^T J^T u with u = J^T v (averaged over the
    K probes). Its implementation computes the second product with u detached (a constant
    cotangent), so that the first backward pass never differentiates through u inside that
    product. The gradient that flows through u there, d/du (v^T J^T u) = J v, is collected on
    the detached copy and pushed through u in a second backward pass. The parameter gradients
    equal those of plain double backward on the same estimate (tested to 1e-10 in float64).

    Args:
        s: the score fn(x), computed from `x` (which requires grad) with its graph.
        x: the input batch.
        probes: shape (K, *x.shape).
        weight: per-sample weight of the penalty, shape (B,), for example lambda sigma^2 / B.
        other_loss: a scalar added to the penalty before the first pass (for example DSM).

    Returns:
        The detached per-sample estimate, shape (B,).
    """
    # Stage 0: u = J^T v with its graph, and J^T u_bar with u_bar a detached leaf copy.
    u = batched_vjp(s, x, probes, create_graph=True)
    u_bar = u.detach().requires_grad_(True)
    w = batched_vjp(s, x, u_bar, create_graph=True)
    estimate = (_per_sample_sq_norm(u, 2) - _per_sample_dot(w, probes, 2)).mean(dim=0)

    # Stage 1: everything except the path through u inside v^T J^T u; u_bar.grad collects it.
    total = other_loss + (weight * estimate).sum()
    total.backward(retain_graph=True)

    # Stage 2: push the collected gradient through u.
    u.backward(u_bar.grad)
    return estimate.detach()
