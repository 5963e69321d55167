"""Time one training step of USBM, CSBM and the QCSBM estimators, as ratios to USBM.

Runs every variant side by side in one process, on the paper's 2-D network (batch 5000) and on
a small convolutional network on 32x32x3 images, and prints a Markdown table with the median
step time and the peak memory of one step. Also compares K = 16 Hutchinson probes that share
one forward pass against the paper's way of replicating the batch 16 times.

Peak memory is what one step allocates (batch, graph, gradients, temporaries) on top of what
exists before it (weights, Adam state): on CUDA from `torch.cuda.max_memory_allocated`, on the CPU from the allocation
events of `torch.profiler` (tensor memory only, not the process's resident set). It is taken
in the untimed warm-up step, because the profiler slows a step down.

    python benchmarks/core_step.py [--repeats 10] [--conv-batch 64] [--threads N]
        [--out FILE.md] [--json FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from qcsbm.losses import Objective
from qcsbm.nets.toy2d import ToyScoreNet
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE
from qcsbm.training import OptimSettings, make_optimizer, train_step


class SmallConvNet(nn.Module):
    """A four-layer convolutional score network with a log-sigma channel (about 120k weights)."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, cond):
        level = cond.log().reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.body(torch.cat([x, level], dim=1))


def time_steps(model, sde, make_batch, objective, *, two_stage=False, repeats=10,
               measure_memory=False):
    """Return the median seconds of one train_step over `repeats` runs after one warm-up.

    With `measure_memory`, return (seconds, peak MiB of the warm-up step as
    `peak_memory_mib` measures it). The Adam state exists before the warm-up, so the peak
    counts the step's graph, gradients and temporaries, but not the optimizer's state.
    """
    settings = OptimSettings(lr=1e-4, ema_rate=0.0)
    optimizer, scheduler = make_optimizer(model, settings)
    create_adam_state(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device

    def step(i):
        train_step(model, sde, make_batch(), optimizer, scheduler, objective, settings,
                   two_stage=two_stage, generator=generator, step=i)

    # The warm-up step runs under the profiler when memory is measured, as its time is unused.
    if measure_memory:
        memory = peak_memory_mib(lambda: step(0), device)
    else:
        step(0)

    times = []
    for i in range(1, repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        step(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return (seconds, memory) if measure_memory else seconds


def create_adam_state(model, optimizer) -> None:
    """Let Adam allocate its moment buffers now, through one step with zero gradients.

    Zero gradients leave both moments at zero, so the step does not change the weights.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(run, device: torch.device) -> float:
    """Return the MiB that run() allocates at its peak on top of what was allocated before.

    On CUDA this reads the caching allocator's statistics. On the CPU it replays the
    allocation and free events that `torch.profiler` records, so it counts tensor memory
    only (no allocator overhead) and tensors freed during run() lower the running total.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak / 2**20


def toy_variants():
    sde = VESDE(0.1, 3.0)
    usbm = UnconstrainedScore(ToyScoreNet(), sde, output="residual")
    csbm = EnergyScore(ToyScoreNet(energy_head=True), sde, form="residual")
    return sde, [
        ("USBM", usbm, Objective(), False),
        ("CSBM", csbm, Objective(), False),
        ("QCSBM exact", usbm, Objective(lambda_qc=0.1, estimator="exact"), False),
        ("QCSBM paper (two-stage)", usbm, Objective(lambda_qc=0.1, estimator="hutchinson"), True),
        ("QCSBM paper (two-stage), K = 4", usbm,
         Objective(lambda_qc=0.1, estimator="hutchinson", num_probes=4), True),
        ("QCSBM non-negative", usbm, Objective(lambda_qc=0.1, estimator="nonnegative"), False),
        ("QCSBM non-negative, K = 4", usbm,
         Objective(lambda_qc=0.1, estimator="nonnegative", num_probes=4), False),
    ]


def conv_variants():
    sde = VESDE(0.01, 50.0)
    usbm = UnconstrainedScore(SmallConvNet(), sde, output="noise")
    csbm = EnergyScore(SmallConvNet(), sde, form="norm")
    hutchinson = Objective(lambda_qc=1e-4, estimator="hutchinson")
    return sde, [
        ("USBM", usbm, Objective(), False),
        ("CSBM", csbm, Objective(), False),
        ("QCSBM paper (two-stage)", usbm, hutchinson, True),
        ("QCSBM paper (plain autograd)", usbm, hutchinson, False),
        ("QCSBM non-negative", usbm, Objective(lambda_qc=1e-4, estimator="nonnegative"), False),
        ("QCSBM non-negative, 1/4 of batch", usbm,
         Objective(lambda_qc=1e-4, estimator="nonnegative", penalty_fraction=0.25), False),
    ]


def probe_sharing(repeats, batch):
    """Time K = 16 probes sharing one forward pass against the replicated batch.

    The paper's code estimates K probes by repeating the batch K times with one probe per
    copy, so the network runs its forward and backward passes on K times the batch.
    """
    sde = VESDE(0.01, 50.0)
    model = UnconstrainedScore(SmallConvNet(), sde, output="noise")

    def make_batch():
        return torch.rand(batch, 3, 32, 32)

    shared = {}
    for estimator in ("hutchinson", "nonnegative"):
        shared[estimator] = time_steps(
            model, sde, make_batch,
            Objective(lambda_qc=1e-4, estimator=estimator, num_probes=16), repeats=repeats)

    replicated = time_steps(
        model, sde, lambda: make_batch().repeat(16, 1, 1, 1),
        Objective(lambda_qc=1e-4, estimator="hutchinson", num_probes=1), repeats=repeats)
    return shared, replicated


def run_table(title, sde, variants, make_batch, repeats, records):
    """Time every variant, append one record per variant to `records`, return Markdown rows."""
    rows = []
    base = None
    for name, model, objective, two_stage in variants:
        seconds, memory = time_steps(model, sde, make_batch, objective, two_stage=two_stage,
                                     repeats=repeats, measure_memory=True)
        base = base or seconds
        records.append({"network": title, "variant": name, "ms": seconds * 1e3,
                        "ratio": seconds / base, "peak_mib": memory})
        rows.append(f"| {title} | {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} "
                    f"| {memory:.1f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--toy-batch", type=int, default=5000, help="batch of the 2-D network")
    parser.add_argument("--conv-batch", type=int, default=32, help="batch of the conv network")
    parser.add_argument("--probe-batch", type=int, default=8,
                        help="batch for the K = 16 probe comparison (the paper uses 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: torch's choice")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    lines = [f"Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| network | variant | ms / step | ratio to USBM | peak MiB / step |",
             "|---|---|---|---|---|"]
    records = []
    sde, variants = toy_variants()
    lines += run_table(f"2-D MLP, batch {args.toy_batch}", sde, variants,
                       lambda: torch.randn(args.toy_batch, 2) * 3, args.repeats, records)
    sde, variants = conv_variants()
    lines += run_table(f"conv 32x32x3, batch {args.conv_batch}", sde, variants,
                       lambda: torch.rand(args.conv_batch, 3, 32, 32), args.repeats, records)

    shared, replicated = probe_sharing(args.repeats, args.probe_batch)
    lines += ["", f"K = 16 probes, conv 32x32x3, batch {args.probe_batch}:", "",
              "| layout | ms / step | speed-up over replicated batch |", "|---|---|---|",
              f"| replicated batch (paper's code), hutchinson | {replicated * 1e3:.1f} | 1.00 |"]
    for estimator, seconds in shared.items():
        lines.append(f"| shared forward pass, {estimator} | {seconds * 1e3:.1f} | "
                     f"{replicated / seconds:.2f} |")

    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    if args.json:
        probes = {"batch": args.probe_batch, "replicated_ms": replicated * 1e3,
                  "shared_ms": {name: seconds * 1e3 for name, seconds in shared.items()}}
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "steps": records,
                       "probe_sharing": probes}, handle, indent=2)


if __name__ == "__main__":
    main()
