"""Measure how the training step's time and memory grow with batch size and with image size.

USBM against QCSBM with the non-negative estimator (K = 1, whole batch penalized), both
`qcsbm.training.train_step` on untrained NCSN++ networks with the VE SDE (sigma 0.01 to 50):

* batch size: `NCSNpp.compact(8, 1)` on 8x8x1 images;
* image size: one fixed architecture at every size (nf 32, ch_mult (1, 2), one residual block
  per level, attention at half the image size) on HxHx3 images, so that only the number of
  pixels changes. Attention cost grows with the square of the number of pixels at that level.

Peak memory is what one step allocates on top of the weights and the Adam state (see
`core_step.time_steps`).

    python benchmarks/scaling.py [--batches 8 16 32 64 128] [--image-sizes 8 16 32]
        [--image-batch 4] [--repeats 2] [--threads N] [--out FILE.md] [--json FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from core_step import time_steps
from qcsbm.losses import Objective
from qcsbm.nets import NCSNpp
from qcsbm.scores import UnconstrainedScore
from qcsbm.sde import VESDE

OBJECTIVES = {"USBM": Objective(),
              "QCSBM non-negative": Objective(lambda_qc=1e-4, estimator="nonnegative")}


def measure(net: NCSNpp, shape: tuple[int, ...], repeats: int, device: torch.device) -> dict:
    """Return {variant: (seconds, peak MiB)} of one step on a batch of the given shape."""
    sde = VESDE(0.01, 50.0)
    model = UnconstrainedScore(net, sde, output="score").to(device)
    result = {}
    for name, objective in OBJECTIVES.items():
        result[name] = time_steps(model, sde, lambda: torch.rand(shape, device=device),
                                  objective, repeats=repeats, measure_memory=True)
    return result


def table_rows(label: str, value: int, batch: int, result: dict) -> str:
    (usbm_s, usbm_mib), (qc_s, qc_mib) = result["USBM"], result["QCSBM non-negative"]
    return (f"| {label} | {value} | {usbm_s * 1e3:.1f} | {usbm_s / batch * 1e3:.2f} "
            f"| {usbm_mib:.1f} | {qc_s * 1e3:.1f} | {qc_s / batch * 1e3:.2f} | {qc_mib:.1f} "
            f"| {qc_s / usbm_s:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                        help="batch sizes for NCSNpp.compact(8, 1)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[8, 16, 32],
                        help="image sides in pixels (even numbers, at least 4)")
    parser.add_argument("--image-batch", type=int, default=4, help="batch of the image sizes")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed steps per case, after one warm-up step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: torch's choice")
    parser.add_argument("--device", default="cpu", help="torch device, for example cuda")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    for size in args.image_sizes:
        if size < 4 or size % 2:
            parser.error(f"invalid image size {size}; expected an even number >= 4")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    lines = [f"Machine: {platform.processor() or platform.machine()}, device {device}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| scaled | value | USBM ms / step | USBM ms / sample | USBM peak MiB "
             "| QCSBM ms / step | QCSBM ms / sample | QCSBM peak MiB | QCSBM / USBM |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []

    # Batch size on the compact 8x8x1 network.
    for batch in args.batches:
        result = measure(NCSNpp.compact(8, 1), (batch, 1, 8, 8), args.repeats, device)
        records.append({"scaled": "batch", "value": batch, "batch": batch, "result": result})
        lines.append(table_rows("batch (compact 8x8x1)", batch, batch, result))
        print(lines[-1], flush=True)

    # Image size with the architecture fixed.
    for size in args.image_sizes:
        net = NCSNpp(image_size=size, num_channels=3, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(size // 2,))
        result = measure(net, (args.image_batch, 3, size, size), args.repeats, device)
        records.append({"scaled": "image size", "value": size, "batch": args.image_batch,
                        "result": result})
        lines.append(table_rows(f"image side (batch {args.image_batch})", size,
                                args.image_batch, result))
        print(lines[-1], flush=True)

    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "device": str(device),
                       "cases": records}, handle, indent=2)


if __name__ == "__main__":
    main()
