"""Time one training step of USBM, CSBM and QCSBM on NCSN++ networks, as ratios to USBM.

Networks (all `qcsbm.nets.NCSNpp`, untrained, in train mode so that dropout runs):

    compact8    NCSNpp.compact(8, 1) on 8x8x1 images (753k parameters)
    compact32   NCSNpp.compact(32, 3) on 32x32x3 images (1.8M parameters)
    tiny        16x16x3, nf 16, ch_mult (1, 2), one residual block, attention at 8x8: the
                tiny configuration of the score_sde_pytorch fixtures that the tests load
    deep        NCSNpp(image_size=32) with its defaults, the paper's deep CIFAR-10 model
                (107M parameters); only USBM and QCSBM, and few steps

Each step is `qcsbm.training.train_step` with the VE SDE (sigma 0.01 to 50). Peak memory is
what one step allocates on top of the weights and the Adam state (see `core_step.time_steps`).
The variant "double-backward JVP" computes the non-negative estimator's J v by two reverse
passes in place of forward-mode AD, to compare the two ways.

    python benchmarks/ncsnpp_step.py [--networks compact8 compact32 tiny deep] [--threads N]
        [--repeats 3] [--deep-repeats 1] [--out FILE.md] [--json FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from core_step import time_steps
from qcsbm.losses import Objective
from qcsbm.nets import NCSNpp
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE

NETWORKS = ("compact8", "compact32", "tiny", "deep")

# The penalty weight only scales a loss term, so any positive value costs the same.
LAMBDA_QC = 1e-4


def build_net(name: str, **overrides) -> tuple[NCSNpp, tuple[int, int, int]]:
    """Return (network, image shape (C, H, W)) for one of NETWORKS."""
    if name == "compact8":
        return NCSNpp.compact(8, 1, **overrides), (1, 8, 8)
    if name == "compact32":
        return NCSNpp.compact(32, 3, **overrides), (3, 32, 32)
    if name == "tiny":
        net = NCSNpp(image_size=16, num_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(8,), **overrides)
        return net, (3, 16, 16)
    return NCSNpp(image_size=32, **overrides), (3, 32, 32)


def variants(name: str, sde: VESDE, device: torch.device):
    """Return [(variant name, score model, objective, two_stage)] for one network."""
    net, shape = build_net(name)
    usbm = UnconstrainedScore(net, sde, output="score").to(device)

    def qc(estimator, **options):
        return Objective(lambda_qc=LAMBDA_QC, estimator=estimator, **options)

    if name == "deep":
        return shape, [
            ("USBM", usbm, Objective(), False),
            ("QCSBM non-negative", usbm, qc("nonnegative"), False),
        ]

    # The energy variant needs the unscaled output, E = 1/2 ||net(x, sigma)||^2 / sigma.
    energy_net, _ = build_net(name, scale_by_sigma=False)
    csbm = EnergyScore(energy_net, sde, form="norm").to(device)
    return shape, [
        ("USBM", usbm, Objective(), False),
        ("CSBM", csbm, Objective(), False),
        ("QCSBM paper (two-stage)", usbm, qc("hutchinson"), True),
        ("QCSBM paper (two-stage), K = 4", usbm, qc("hutchinson", num_probes=4), True),
        ("QCSBM non-negative", usbm, qc("nonnegative"), False),
        ("QCSBM non-negative, K = 4", usbm, qc("nonnegative", num_probes=4), False),
        ("QCSBM non-negative, double-backward JVP", usbm,
         qc("nonnegative", jvp="double-backward"), False),
        ("QCSBM non-negative, 1/4 of batch", usbm, qc("nonnegative", penalty_fraction=0.25),
         False),
    ]


def measure_network(name: str, batch: int, repeats: int, device: torch.device, records: list):
    """Time every variant of one network; append records and return Markdown rows."""
    sde = VESDE(0.01, 50.0)
    shape, cases = variants(name, sde, device)
    parameters = sum(p.numel() for p in cases[0][1].parameters())
    title = f"NCSN++ {name} {shape[1]}x{shape[2]}x{shape[0]}, batch {batch}"

    def make_batch():
        return torch.rand(batch, *shape, device=device)

    rows = []
    base = None
    for variant, model, objective, two_stage in cases:
        seconds, memory = time_steps(model, sde, make_batch, objective, two_stage=two_stage,
                                     repeats=repeats, measure_memory=True)
        base = base or seconds
        records.append({"network": title, "variant": variant, "parameters": parameters,
                        "ms": seconds * 1e3, "ratio": seconds / base, "peak_mib": memory})
        rows.append(f"| {title} | {variant} | {seconds * 1e3:.1f} | {seconds / base:.2f} "
                    f"| {memory:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS,
                        help="networks to measure")
    parser.add_argument("--batch-compact8", type=int, default=64, help="batch of compact8")
    parser.add_argument("--batch-compact32", type=int, default=8, help="batch of compact32")
    parser.add_argument("--batch-tiny", type=int, default=8, help="batch of tiny")
    parser.add_argument("--batch-deep", type=int, default=2, help="batch of deep")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed steps per variant, after one warm-up step")
    parser.add_argument("--deep-repeats", type=int, default=1,
                        help="timed steps per variant of the deep network")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: torch's choice")
    parser.add_argument("--device", default="cpu", help="torch device, for example cuda")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    lines = [f"Machine: {platform.processor() or platform.machine()}, device {device}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| network | variant | ms / step | ratio to USBM | peak MiB / step |",
             "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []
    for name in args.networks:
        batch = getattr(args, f"batch_{name}")
        repeats = args.deep_repeats if name == "deep" else args.repeats
        lines += measure_network(name, batch, repeats, device, records)

    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "device": str(device),
                       "steps": records}, handle, indent=2)


if __name__ == "__main__":
    main()
