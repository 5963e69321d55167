"""Time `qcsbm sample`'s block sampling with the compact image NCSN++, and the feature pass.

Each case runs `qcsbm.sample_shards.sample_blocks` (the sampler plus quantization to uint8)
and prints one Markdown row: wall time, NFE per sample, seconds per score evaluation and
samples per second. Without --workdir the network is the digits preset's compact NCSN++
(8 x 8 x 1, model.nf 32) with random weights, so the ODE's NFE show the cost of a solve,
not the NFE of a trained model. With --workdir the run's own model is loaded.

The feature pass times Inception-v3 (torch-fidelity's FID network, random weights unless
--inception-weights is given) on the sampled uint8 images, resized to 299 x 299 inside.

    python benchmarks/sample_throughput_images.py [--workdir DIR] [--batch-size 64]
        [--pc-steps 100] [--rtol 1e-5] [--threads N] [--device cpu] [--skip-features]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from qcsbm.evaluation import samples_to_images
from qcsbm.sample_shards import sample_blocks
from qcsbm.sampling import NFELimitError, ode_sample, pc_sample

#: A cap for the adaptive solves, so that random weights cannot stall the run.
MAX_NFE = 2000


def random_run(device):
    """Return (score_model, sde, data metadata) of the digits preset with random weights."""
    from qcsbm.models import build_score_model, data_scale
    from qcsbm.presets import preset_config

    cfg = preset_config("digits-usbm")
    torch.manual_seed(0)
    score_model, sde = build_score_model(cfg)
    # The preset's output layers start near zero (model.init_scale 0); noise makes the
    # score non-trivial, so the solver has work to do.
    with torch.no_grad():
        for parameter in score_model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    scale, shift = data_scale(cfg.model)
    data = {"image_shape": [1, 8, 8], "num_levels": 17, "scale": scale, "shift": shift,
            "dequantize": True}
    return score_model.to(device).eval(), sde, data, "compact NCSN++ 8x8x1, random"


def trained_run(workdir, device):
    from qcsbm.models import load_run

    run = load_run(workdir, device=device)
    name = f"{run.config.training.kind} step {run.step} ({workdir})"
    return run.score_model, run.sde, run.data, name


def time_sampler(name, score_model, sde, data, args, device):
    """Return (seconds, mean NFE or None, images) of one batch of `args.batch_size` samples."""
    shape_tail = tuple(data["image_shape"])

    def sample_block(count, generator):
        shape = (count, *shape_tail)
        if name == "pc":
            result = pc_sample(score_model, sde, shape, num_steps=args.pc_steps,
                               corrector="langevin", generator=generator, device=device)
        else:
            result = ode_sample(score_model, sde, shape, rtol=args.rtol, atol=args.rtol,
                                max_nfe=MAX_NFE, generator=generator, device=device)
        return samples_to_images(result.samples, data), result.nfe

    job = {"num_samples": args.batch_size, "batch_size": args.batch_size, "seed": 0}
    start = time.perf_counter()
    try:
        samples = sample_blocks(sample_block, job, [0])
    except NFELimitError:
        return time.perf_counter() - start, None, None
    return time.perf_counter() - start, samples.metadata["nfe_mean"], samples.images


def time_features(images, args) -> tuple[float, int]:
    """Return (seconds, image count) of one Inception-v3 feature pass over `images`."""
    from qcsbm.metrics.inception import (InceptionV3Features, extract_features,
                                         untrained_inception_state_dict)

    with tempfile.TemporaryDirectory() as folder:
        weights = args.inception_weights
        if weights is None:
            weights = Path(folder) / "random-inception.pth"
            torch.save(untrained_inception_state_dict(seed=0), weights)
        extractor = InceptionV3Features(weights).to(args.device)

    extract_features(images[:1], extractor, device=args.device, progress=False)  # warm-up
    start = time.perf_counter()
    extract_features(images, extractor, batch_size=args.batch_size, device=args.device,
                     progress=False)
    return time.perf_counter() - start, len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a `qcsbm train` run (default: random weights)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--pc-steps", type=int, default=100, help="PC predictor steps")
    parser.add_argument("--rtol", type=float, default=1e-5, help="ODE rtol and atol")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--inception-weights", type=Path, help="real Inception weights file")
    parser.add_argument("--skip-features", action="store_true", help="skip the feature pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.workdir:
        score_model, sde, data, model_name = trained_run(args.workdir, device)
    else:
        score_model, sde, data, model_name = random_run(device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}; {model_name}")
    print("| case | batch | seconds | NFE per sample | ms per NFE | samples/s |")
    print("|---|---|---|---|---|---|")

    images = None
    for name, label in (("pc", f"PC, {args.pc_steps} steps + Langevin"),
                        ("ode", f"ODE dopri5, rtol = atol = {args.rtol:g}")):
        seconds, nfe, batch_images = time_sampler(name, score_model, sde, data, args, device)
        if nfe is None:
            print(f"| {label} | {args.batch_size} | {seconds:.2f} | > {MAX_NFE} | | |")
            continue
        images = batch_images if images is None else images
        print(f"| {label} | {args.batch_size} | {seconds:.2f} | {nfe:.0f} | "
              f"{1000 * seconds / nfe:.1f} | {args.batch_size / seconds:.2f} |")

    if not args.skip_features and images is not None:
        seconds, count = time_features(images, args)
        print(f"| Inception-v3 features (299 x 299) | {args.batch_size} | {seconds:.2f} | | | "
              f"{count / seconds:.2f} images/s |")


if __name__ == "__main__":
    main()
