"""Measure training throughput of 2-process DDP (gloo, CPU) against one process.

Both sides train the compact NCSN++ of the digits presets on random 8x8 images with the same
global batch: one process with T threads, or W processes with max(1, T // W) threads each
and batch / W images per rank. A step is forward, backward (with the DDP all-reduce), gradient
clipping and Adam. Prints a Markdown table of seconds per step and images per second.

    python benchmarks/ddp_throughput.py [--batch 32] [--steps 5] [--threads 2]
        [--world-size 2] [--kinds usbm qcsbm-nonnegative] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from qcsbm import distributed
from qcsbm.models import build_score_model
from qcsbm.presets import load_config
from qcsbm.trainer import make_objective
from qcsbm.training import OptimSettings, make_optimizer, train_step

# variant name: (digits preset, training.estimator or None to keep the preset's)
VARIANTS = {
    "usbm": ("digits-usbm", None),
    "csbm": ("digits-csbm", None),
    "qcsbm-nonnegative": ("digits-qcsbm", "nonnegative"),
    "qcsbm-hutchinson": ("digits-qcsbm", "hutchinson"),
}


def step_seconds(variant: str, batch: int, steps: int, context) -> list[float]:
    """Time `steps` training steps (after one warm-up step) of `variant` on this rank."""
    preset, estimator = VARIANTS[variant]
    cfg = load_config(preset)
    if estimator is not None:
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training,
                                                                    estimator=estimator))
    torch.manual_seed(0)
    score_model, sde = build_score_model(cfg)
    model = distributed.wrap_model(score_model, context)
    objective = make_objective(cfg)
    settings = OptimSettings(lr=1e-4, ema_rate=0.0)
    optimizer, scheduler = make_optimizer(score_model, settings)
    generator = torch.Generator().manual_seed(distributed.rank_seed(0, context.rank))

    images = torch.rand(batch // context.world_size, 1, 8, 8, generator=generator) * 2 - 1
    times = []
    for step in range(steps + 1):
        context.barrier()
        start = time.perf_counter()
        train_step(model, sde, images, optimizer, scheduler, objective, settings,
                   generator=generator, step=step)
        context.barrier()
        times.append(time.perf_counter() - start)
    return times[1:]


def worker(rank: int, world_size: int, port: int, threads: int, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    context = distributed.init_distributed("cpu")
    try:
        results = {variant: step_seconds(variant, args.batch, args.steps, context)
                   for variant in args.kinds}
    finally:
        distributed.cleanup_distributed()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "times.pt"))


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(world_size: int, args) -> dict:
    """Return {variant: seconds per step} for `world_size` processes."""
    threads = max(1, args.threads // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(world_size, free_port(), threads, args, out_dir),
                           nprocs=world_size, start_method="spawn")
        times = torch.load(os.path.join(out_dir, "times.pt"), weights_only=True)
    return {variant: statistics.median(values) for variant, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="global batch per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads of the single process; each of the W processes "
                        "gets threads // W, at least 1")
    parser.add_argument("--world-size", type=int, default=2, help="processes of the DDP run")
    parser.add_argument("--kinds", nargs="+", default=["usbm", "qcsbm-nonnegative"],
                        choices=list(VARIANTS), help="variants to time")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    distributed.rank_batch_size(args.batch, args.world_size)

    single = measure(1, args)
    multi = measure(args.world_size, args)

    per_rank = max(1, args.threads // args.world_size)
    lines = [f"DDP throughput, compact NCSN++ on 8x8 images, global batch {args.batch}, "
             f"1 process with {args.threads} threads against {args.world_size} with "
             f"{per_rank} each ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, median of {args.steps} steps)",
             "",
             f"| variant | 1 process s/step | {args.world_size} processes s/step | "
             f"1 process img/s | {args.world_size} processes img/s | speed-up |",
             "|---|---|---|---|---|---|"]
    for variant in args.kinds:
        one, many = single[variant], multi[variant]
        lines.append(f"| {variant} | {one:.3f} | {many:.3f} | {args.batch / one:.1f} | "
                     f"{args.batch / many:.1f} | {one / many:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()
