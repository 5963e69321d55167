"""Data-parallel training with torchrun and DistributedDataParallel (DDP).

Launch with `torchrun --nproc_per_node N -m qcsbm train ...`. torchrun sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and joins the process
group (NCCL on CUDA, one GPU per local rank; gloo on the CPU). Without those variables it
returns a single-process context and nothing else changes.

Batch size: `data.batch_size` is the global batch of one optimizer step. Each rank draws
batch_size / world_size images per step (see `rank_batch_size`), so the optimization does
not depend on the number of ranks. DDP averages the gradients over the ranks, which equals
the gradient of the mean loss over the global batch.

How the quasi-conservative (QC) penalty runs under DDP (tests/test_distributed.py compares
2 gloo ranks with one process on the combined batch in float64, to rounding):

* The penalty differentiates the score with respect to the input (`torch.autograd.grad`
  with `create_graph=True`) and, for the "nonnegative" estimator, computes J v with forward-
  mode `torch.func.jvp`. Both may run through the DDP wrapper. DDP's reducer reacts only to
  gradients accumulated into parameters, and those arrive in the single `backward()` call
  of the step, once per parameter. So gradients with respect to x inside the loss leave
  DDP's bookkeeping alone, and the energy model's double backward (CSBM) works the same way.
* Wrap with `find_unused_parameters=False` (the default of `wrap_model`) when every
  parameter reaches the loss. With `find_unused_parameters=True`, DDP passes the output
  through an autograd.Function that `torch.func` cannot transform, so forward-mode J v fails
  there: jvp "auto" then falls back to double backward (correct but slower) and jvp "forward"
  raises RuntimeError.
* The two-stage backward of the QCSBM authors' code (`qcsbm.losses.backward_two_stage`)
  calls `backward()` twice on one forward pass. DDP reduces during the first call and
  ignores the second, so the ranks would silently diverge. `micro_batch_contexts(...,
  two_stage=True)` therefore turns DDP's reduction off for every micro-batch, and
  `average_gradients` then averages the accumulated gradients with one all-reduce, exactly
  once per step.

Gradient accumulation: all micro-batches but the last run inside `model.no_sync()`, so DDP
all-reduces once per step, in the last backward (see `micro_batch_contexts`).

Mixed precision: `autocast_qc_loss` runs the DSM forward pass under bfloat16 autocast and
computes the QC penalty in float32, from a separate forward pass of the penalized samples.
The penalty is tr(J J^T) - tr(J J), a difference of two nearly equal sums once the model is
close to conservative. bfloat16 keeps 8 significant bits, so rounding would dominate that
difference. It is meant for CUDA. The tests run it with CPU autocast only, because this
project's test machines have no GPU.

NOTE: the NCCL and CUDA paths (one GPU per rank, autocast on CUDA) have not run yet; the
tests use gloo on the CPU. `qcsbm train` does not call `autocast_qc_loss`: its "bf16" option
runs the whole forward pass, the penalty's Jacobian products included, under autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qcsbm import jacobian as jac
from qcsbm.errors import UsageError, check_choice
from qcsbm.losses import LossTerms, Objective, dsm_from_score, perturb_batch
from qcsbm.sde import SDE

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")

#: Variables that torchrun sets for every worker process.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in a (possibly single-process) training job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None   # None when no process group was created

    @property
    def is_distributed(self) -> bool:
        """Whether a process group with more than one process is active."""
        return self.backend is not None

    @property
    def is_main_process(self) -> bool:
        """Whether this process is rank 0, the one that writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank reaches this call (no-op in a single process)."""
        barrier()


def _env_int(name: str, minimum: int) -> int:
    value = os.environ.get(name)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise UsageError(f"invalid environment variable {name}={value!r}; expected an integer "
                         f">= {minimum}, as torchrun sets it")
    return number


def init_distributed(device: str | torch.device | None = None, backend: str | None = None, *,
                     timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group that torchrun describes in the environment, if any.

    Args:
        device: "cpu" or "cuda" (the local rank picks the GPU); None picks CUDA when
            available. A single process also accepts an indexed device such as "cuda:1".
        backend: "gloo" or "nccl"; None picks NCCL for CUDA and gloo for the CPU.
        timeout_s: seconds a collective operation may wait for the other ranks.

    Returns a single-process context (rank 0 of 1, no process group) when WORLD_SIZE is not
    set or is 1. Raises UsageError for inconsistent torchrun variables, a backend that does
    not fit the device, or a local rank without a GPU of its own.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"invalid device {str(device)!r}: CUDA is not available; use 'cpu'")

    if not launched_by_torchrun():
        return DistributedContext(device=device)

    # torchrun's variables, checked before any connection is attempted.
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UsageError(f"missing environment variables {', '.join(missing)} for distributed "
                         "training; launch with torchrun, which sets them")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if rank >= world_size:
        raise UsageError(f"invalid environment variable RANK={rank}; expected < WORLD_SIZE "
                         f"({world_size})")

    # One GPU per local rank; NCCL needs CUDA and gloo is the CPU backend.
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    check_choice("backend", backend, BACKENDS)
    if backend == "nccl" and device.type != "cuda":
        raise UsageError(f"invalid backend 'nccl' on device {device}; NCCL needs CUDA, use "
                         "'gloo' on the CPU")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU of its own: this node has "
                             f"{torch.cuda.device_count()}; start at most that many processes "
                             "per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("joined process group: rank %d of %d (local rank %d), backend %s, device %s",
                rank, world_size, local_rank, backend, device)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size,
                              device=device, backend=backend)


def barrier() -> None:
    """Wait until every rank of the process group reaches this call (no-op without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """Return whether `flag` is true on at least one rank (`flag` itself without a group).

    Every rank must call it at the same point. `device` must be a CUDA device for NCCL.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def launched_by_torchrun() -> bool:
    """Return whether the environment describes a job of more than one process."""
    return os.environ.get("WORLD_SIZE") is not None and _env_int("WORLD_SIZE", 1) > 1


def cleanup_distributed() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch_size(batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Return the images one rank draws per optimizer step from the global `batch_size`.

    Raises UsageError unless batch_size is divisible by world_size * accumulate, so that
    every micro-batch on every rank has the same size.
    """
    if batch_size % (world_size * accumulate) != 0:
        raise UsageError(f"invalid data.batch_size {batch_size}; the global batch must be "
                         f"divisible by the number of processes ({world_size}) times "
                         f"training.accumulate ({accumulate}), that is by "
                         f"{world_size * accumulate}")
    return batch_size // world_size


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """Return a seed for rank `rank`'s random stream, unrelated to the other ranks' streams.

    The streams must differ, because ranks that draw the same noise or probes train on
    correlated samples. NumPy's SeedSequence hashes (seed, rank, *more), so nearby tuples
    give unrelated seeds. `more` can add, for example, the step number.
    """
    entropy = [int(seed), int(rank), *(int(value) for value in more)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def rank_generator(seed: int, rank: int, *more: int,
                   device: str | torch.device = "cpu") -> torch.Generator:
    """Return a generator on `device` seeded with `rank_seed(seed, rank, *more)`."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank, *more))


def wrap_model(model: nn.Module, context: DistributedContext, *,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap `model` (already on `context.device`) in DDP, or return it in a single process.

    DDP broadcasts rank 0's parameters and buffers to the other ranks here, so every rank
    starts from the same weights. See the module docstring for `find_unused_parameters`.
    """
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP wrapper, or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def micro_batch_contexts(model: nn.Module, num_micro_batches: int, *,
                         two_stage: bool = False) -> list:
    """Return one context per micro-batch that decides whether DDP all-reduces its backward.

    Enter each around the micro-batch's forward and backward passes. All but the last
    disable DDP's reduction (`no_sync`), so gradients accumulate locally and the last
    backward all-reduces their sum. With `two_stage` every micro-batch runs without DDP's
    reduction, and `average_gradients` must follow. Returns no-op contexts for an
    unwrapped model.
    """
    if num_micro_batches < 1:
        raise UsageError(f"invalid num_micro_batches {num_micro_batches!r}; expected an "
                         "integer >= 1")
    if not isinstance(model, DistributedDataParallel):
        return [contextlib.nullcontext() for _ in range(num_micro_batches)]
    unsynced = num_micro_batches if two_stage else num_micro_batches - 1
    contexts = [model.no_sync() for _ in range(unsynced)]
    return contexts + [contextlib.nullcontext()] * (num_micro_batches - unsynced)


def average_gradients(model: nn.Module) -> None:
    """Average the parameters' .grad over all ranks with one all-reduce (no-op without DDP).

    For gradients that DDP did not reduce (the two-stage backward, see the module
    docstring). Parameters whose .grad is None are skipped, which requires the same
    parameters to have gradients on every rank, as they do for one network and one loss.
    """
    if not (isinstance(model, DistributedDataParallel) and dist.is_initialized()):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def autocast_qc_loss(score_model, sde: SDE, x0: torch.Tensor, objective: Objective, *,
                     t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.bfloat16, device_type: str = "cuda",
                     enabled: bool = True) -> LossTerms:
    """Compute `qcsbm.losses.qc_loss` with the DSM forward under autocast, the penalty in float32.

    Draws t, z and the probes from `generator` in the same order as `qc_loss`, so with
    `enabled=False` (autocast off) both give the same terms. Costs one more forward pass of
    the penalized samples than `qc_loss`, which shares one pass between both terms.
    `dtype` and `device_type` are those of `torch.autocast`.
    """
    batch = perturb_batch(sde, x0, t=t, noise=noise, generator=generator)

    # DSM in reduced precision; the score is cast back to x0's dtype for the squared error.
    with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
        score = score_model(batch.x_t, batch.t)
    dsm = dsm_from_score(score.to(x0.dtype), batch, sde, objective.weighting)
    total = dsm.mean()
    if objective.lambda_qc == 0:
        return LossTerms(total=total, dsm=dsm, penalty=dsm.new_zeros(0), t=batch.t,
                         std=batch.std)

    # The penalty in float32 from its own forward pass of the leading samples.
    num = max(1, math.ceil(objective.penalty_fraction * x0.shape[0]))
    t_sub = batch.t[:num]

    def score_fn(x):
        return score_model(x, t_sub)

    with torch.autocast(device_type=device_type, enabled=False):
        asym = jac.jacobian_asymmetry(
            score_fn, batch.x_t[:num], method=objective.estimator,
            num_probes=objective.num_probes, probe=objective.probe, generator=generator,
            jvp=objective.jvp, create_graph=True)
    penalty = batch.std[:num] ** 2 * asym
    total = total + objective.lambda_qc * penalty.mean()
    return LossTerms(total=total, dsm=dsm, penalty=penalty, t=batch.t, std=batch.std)

