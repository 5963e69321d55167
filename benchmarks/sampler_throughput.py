"""Time the samplers and the likelihood on the 2-D network and on small image networks.

The image networks are a three-layer convolutional network on 32x32x3 and the compact NCSN++
(`NCSNpp.compact(8, 1)`) on 8x8x1.

For each case prints one Markdown row with the wall time, the number of score evaluations
(NFE), the time per evaluation and the throughput in samples per second. The networks are
untrained (random weights). So the adaptive solvers' NFE show what a solve costs per
evaluation, not the NFE a trained model needs. The fixed-grid samplers' NFE equal their
step counts.

    python benchmarks/sampler_throughput.py [--num-steps 100] [--toy-batch 1000]
        [--image-batch 16] [--compact-batch 16] [--threads N] [--device cpu] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from qcsbm.likelihood import log_likelihood
from qcsbm.nets import NCSNpp
from qcsbm.nets.toy2d import ToyScoreNet
from qcsbm.sampling import NFELimitError, ode_sample, pc_sample
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE

#: A cap for the adaptive solves, so that an untrained network cannot stall the run.
MAX_NFE = 2000


class TinyConvNet(nn.Module):
    """Three 3x3 convolutions with log sigma as an extra input channel (about 24k weights)."""

    def __init__(self, channels: int = 3, width: int = 48):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, cond):
        log_sigma = cond.log().reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.layers(torch.cat([x, log_sigma], dim=1))


def timed(run):
    """Return (seconds, nfe) of one call of run(); nfe is None when it hit MAX_NFE."""
    start = time.perf_counter()
    try:
        nfe = run().nfe
    except NFELimitError:
        nfe = None
    return time.perf_counter() - start, nfe


def row(model_name, method, batch, seconds, nfe):
    if nfe is None:
        return f"| {model_name} | {method} | {batch} | {seconds:.2f} | > {MAX_NFE} | | |"
    per_eval = seconds / nfe * 1e3
    return (f"| {model_name} | {method} | {batch} | {seconds:.2f} | {nfe} | {per_eval:.2f} "
            f"| {batch / seconds:.1f} |")


def cases(args):
    """Yield (model name, method name, batch, callable) for every measured case."""
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    steps = args.num_steps
    solver = dict(max_nfe=MAX_NFE, device=device, generator=generator)

    toy_sde = VESDE(0.1, 3.0)
    toy_models = {
        "2-D USBM": UnconstrainedScore(ToyScoreNet(), toy_sde, output="residual"),
        "2-D CSBM": EnergyScore(ToyScoreNet(energy_head=True), toy_sde, form="residual"),
    }
    toy_shape = (args.toy_batch, 2)
    toy_data = torch.randn(toy_shape, generator=generator, device=device)
    for name, model in toy_models.items():
        model.to(device).eval()
        yield name, f"PC reverse diffusion, {steps} steps", args.toy_batch, (
            lambda m=model: pc_sample(m, toy_sde, toy_shape, num_steps=steps,
                                      generator=generator, device=device))
        yield name, f"PC + Langevin, {steps} steps", args.toy_batch, (
            lambda m=model: pc_sample(m, toy_sde, toy_shape, num_steps=steps,
                                      corrector="langevin", generator=generator, device=device))
        yield name, "ODE dopri5", args.toy_batch, (
            lambda m=model: ode_sample(m, toy_sde, toy_shape, **solver))
        yield name, "likelihood, exact divergence", args.toy_batch, (
            lambda m=model: log_likelihood(m, toy_sde, toy_data, max_nfe=MAX_NFE))

    image_sde = VESDE(0.01, 50.0)
    image_model = UnconstrainedScore(TinyConvNet(), image_sde, output="noise").to(device).eval()
    image_shape = (args.image_batch, 3, 32, 32)
    image_data = torch.rand(image_shape, generator=generator, device=device) * 2 - 1
    yield "32x32 conv USBM", f"PC reverse diffusion, {steps} steps", args.image_batch, (
        lambda: pc_sample(image_model, image_sde, image_shape, num_steps=steps,
                          generator=generator, device=device))
    yield "32x32 conv USBM", "ODE dopri5", args.image_batch, (
        lambda: ode_sample(image_model, image_sde, image_shape, **solver))
    yield "32x32 conv USBM", "likelihood, Hutchinson, 1 probe", args.image_batch, (
        lambda: log_likelihood(image_model, image_sde, image_data, divergence="hutchinson",
                               generator=generator, max_nfe=MAX_NFE))

    # The compact NCSN++ outputs the score itself (its output is divided by sigma).
    compact = UnconstrainedScore(NCSNpp.compact(8, 1), image_sde, output="score")
    compact = compact.to(device).eval()
    compact_shape = (args.compact_batch, 1, 8, 8)
    compact_data = torch.rand(compact_shape, generator=generator, device=device)
    name = "8x8x1 compact NCSN++ USBM"
    yield name, f"PC reverse diffusion, {steps} steps", args.compact_batch, (
        lambda: pc_sample(compact, image_sde, compact_shape, num_steps=steps,
                          generator=generator, device=device))
    yield name, "ODE dopri5", args.compact_batch, (
        lambda: ode_sample(compact, image_sde, compact_shape, **solver))
    yield name, "likelihood, Hutchinson, 1 probe", args.compact_batch, (
        lambda: log_likelihood(compact, image_sde, compact_data, divergence="hutchinson",
                               generator=generator, max_nfe=MAX_NFE))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=100, help="steps of the PC samplers")
    parser.add_argument("--toy-batch", type=int, default=1000, help="batch of 2-D samples")
    parser.add_argument("--image-batch", type=int, default=16, help="batch of 32x32 images")
    parser.add_argument("--compact-batch", type=int, default=16,
                        help="batch of 8x8 images for the compact NCSN++")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device, for example cuda")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    lines = [
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        "",
        "| model | method | batch | seconds | NFE | ms per NFE | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for model_name, method, batch, run in cases(args):
        seconds, nfe = timed(run)
        lines.append(row(model_name, method, batch, seconds, nfe))
        print(lines[-1], flush=True)

    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
