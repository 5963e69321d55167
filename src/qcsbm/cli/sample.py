"""`qcsbm sample`: draw samples from a trained run and save them as uint8 images.

    qcsbm sample --workdir DIR --sampler {pc,ode} --num N [--out FILE] [--shard i/n] ...
    qcsbm sample merge SHARD_DIR [--out FILE]

Samples are saved as an .npz file (`qcsbm.sample_shards.save_samples`): "images" uint8
(N, H, W, C) with pixel values 0..255 (levels of the data set mapped as described in
`qcsbm.evaluation`), "indices" and a JSON "metadata" string with the checkpoint step, the
sampler and its settings, the NFE, the seed and the shard. A PNG grid of the first 64
samples goes next to it.

With `--shard i/n`, or under `torchrun --nproc_per_node n`, --out is a shard folder that
receives one file per shard and a manifest. `qcsbm sample merge` checks and merges it, and
under torchrun rank 0 merges once every rank is done. Write --num-samples under torchrun,
because torchrun's parser reads --num as an abbreviation of its own --numa-binding.

Sample i is drawn from a seed derived from --seed and its block of --batch-size samples, so
the merged samples equal those of one unsharded run with the same --seed and --batch-size.
A finished shard is skipped when the command runs again.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SAMPLERS = ("pc", "ode")

_EXAMPLE = "example: qcsbm sample --workdir runs/digits-qcsbm --sampler ode --num 64"


def add_parser(subparsers) -> None:
    """Register the subcommand."""
    parser = subparsers.add_parser(
        "sample", help="draw samples from a trained run (or merge sample shards)",
        description="Draw samples from the newest checkpoint of a `qcsbm train` run with the "
        "predictor-corrector sampler or the probability-flow ODE, and save them as uint8 "
        "images in an .npz file with a PNG grid. `qcsbm sample merge DIR` merges the shard "
        "folder of a sharded run.",
        epilog=_EXAMPLE + "; sharded: add --shard 0/2 and --shard 1/2, then "
        "`qcsbm sample merge DIR`.")
    parser.add_argument("action", nargs="?", metavar="merge",
                        help="merge the shard folder DIRECTORY instead of sampling")
    parser.add_argument("directory", nargs="?", metavar="DIRECTORY",
                        help="the shard folder to merge (with `merge`)")
    parser.add_argument("--workdir", metavar="DIR", help="run folder of `qcsbm train`")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="pc: predictor-corrector (reverse diffusion + Langevin); ode: "
                        "probability-flow ODE with an adaptive solver")
    parser.add_argument("--num", "--num-samples", dest="num", type=int, metavar="N",
                        help="number of samples in total; under torchrun write --num-samples, "
                        "because torchrun's own parser takes --num for its --numa-binding")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B",
                        help="samples per batch; with --seed it fixes every sample "
                        "(default: 64)")
    parser.add_argument("--out", metavar="FILE",
                        help="the .npz file (a folder when sharded); default: "
                        "DIR/samples/<sampler>_step<step>_seed<seed>_n<N>[.npz]")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file and its PNG grid")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--shard", metavar="i/n",
                        help="draw only shard i of n into the shard folder --out")
    parser.add_argument("--steps", type=int, metavar="K",
                        help="pc: predictor steps (default: the run's model.num_scales)")
    parser.add_argument("--snr", type=float, default=0.16,
                        help="pc: Langevin signal-to-noise ratio (default: 0.16, score_sde's "
                        "CIFAR-10 VE setting)")
    parser.add_argument("--predictor", choices=("reverse_diffusion", "euler_maruyama"),
                        default="reverse_diffusion", help="pc: predictor (default: %(default)s)")
    parser.add_argument("--corrector", choices=("langevin", "none"), default="langevin",
                        help="pc: corrector (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="ode: relative tolerance (default: 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="ode: absolute tolerance (default: 1e-5)")
    parser.add_argument("--method", default="dopri5",
                        help="ode: adaptive torchdiffeq method (default: dopri5)")
    parser.add_argument("--max-nfe", type=int, metavar="K",
                        help="ode: stop with an error after K score evaluations per batch")
    parser.add_argument("--use-model-weights", action="store_true",
                        help="use the raw weights instead of the EMA weights")
    parser.add_argument("--checkpoint-step", type=int, metavar="STEP",
                        help="use the checkpoint of this training step (default: the newest)")
    parser.add_argument("--device", help="device, e.g. cpu or cuda:0 (default: CUDA when "
                        "available)")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args) -> int:
    """Run the subcommand."""
    from qcsbm.errors import UsageError

    if args.action is not None:
        if args.action != "merge":
            raise UsageError(f"invalid action {args.action!r}; expected 'merge' (qcsbm sample "
                             "merge DIRECTORY) or options only; " + _EXAMPLE)
        if args.directory is None:
            raise UsageError("missing DIRECTORY: qcsbm sample merge DIRECTORY")
        return _merge(Path(args.directory), args.out, args.overwrite)

    settings = _check_arguments(args)
    from qcsbm.distributed import cleanup_distributed, init_distributed, launched_by_torchrun
    from qcsbm.sample_shards import parse_shard

    # Under torchrun each rank samples its own shard on its own device (its GPU on CUDA).
    context = None
    if args.shard is not None:
        shard, device = parse_shard(args.shard), _device(args.device)
    elif launched_by_torchrun():
        context = init_distributed(args.device)
        shard, device = (context.rank, context.world_size), context.device
    else:
        shard, device = None, _device(args.device)
    try:
        return _sample(args, settings, shard, device, context)
    finally:
        if context is not None:
            cleanup_distributed()


def _sample(args, settings: dict, shard, device, context) -> int:
    from qcsbm.errors import UsageError
    from qcsbm.models import load_run

    loaded = load_run(args.workdir, use_ema=not args.use_model_weights,
                    step=args.checkpoint_step, device=device)
    if args.sampler == "pc" and settings["num_steps"] is None:
        settings["num_steps"] = loaded.config.model.num_scales
    job = _job(args, loaded, settings)
    out = Path(args.out) if args.out else _default_out(args, loaded, sharded=shard is not None)
    if shard is None and out.suffix != ".npz":
        raise UsageError(f"invalid --out {str(out)!r}; expected a file name ending in .npz")
    if shard is None:
        _check_not_overwriting(out, args.overwrite)

    sample_block = _block_sampler(loaded, args.sampler, settings, device)
    if shard is None:
        return _sample_whole(out, job, sample_block, progress=not args.quiet)
    return _sample_shard(out, job, sample_block, shard, context=context,
                         progress=not args.quiet)


# --- arguments ------------------------------------------------------------------------------

def _check_arguments(args) -> dict:
    """Check the options before anything is loaded and return the sampler settings."""
    from qcsbm.errors import UsageError
    from qcsbm.sampling import check_solver_options

    if args.workdir is None:
        raise UsageError("missing --workdir DIR, the run folder; " + _EXAMPLE)
    if args.sampler is None:
        raise UsageError("missing --sampler; expected 'pc' or 'ode'")
    if args.num is None or args.num < 1:
        raise UsageError(f"invalid --num {args.num!r}; expected an integer >= 1")
    if args.batch_size < 1:
        raise UsageError(f"invalid --batch-size {args.batch_size!r}; expected an integer >= 1")
    if args.seed < 0:
        raise UsageError(f"invalid --seed {args.seed!r}; expected an integer >= 0")

    if args.sampler == "pc":
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"invalid --steps {args.steps!r}; expected an integer >= 1")
        if not args.snr > 0:
            raise UsageError(f"invalid --snr {args.snr!r}; expected a number > 0")
        corrector = None if args.corrector == "none" else args.corrector
        return {"num_steps": args.steps, "predictor": args.predictor, "corrector": corrector,
                "snr": args.snr if corrector else None, "corrector_steps": 1, "denoise": True}

    check_solver_options(args.method, args.rtol, args.atol, args.max_nfe)
    return {"method": args.method, "rtol": args.rtol, "atol": args.atol,
            "max_nfe": args.max_nfe, "denoise": True}


def _device(name):
    from qcsbm.devices import check_device, default_device

    return default_device() if name is None else check_device(name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _job(args, loaded, settings: dict) -> dict:
    """Return the settings that every shard of one job must share."""
    return {
        "workdir": str(Path(args.workdir).resolve()),
        "checkpoint": loaded.checkpoint_path.name,
        "checkpoint_sha256": _sha256(loaded.checkpoint_path),
        "checkpoint_step": loaded.step,
        "weights": loaded.weights,
        "sampler": args.sampler,
        "settings": settings,
        "seed": args.seed,
        "num_samples": args.num,
        "batch_size": args.batch_size,
        "image_shape": list(loaded.data["image_shape"]),
        "data": {key: loaded.data.get(key) for key in ("name", "num_levels", "scale", "shift",
                                                     "dequantize")},
    }


def _default_out(args, loaded, *, sharded: bool) -> Path:
    stem = f"{args.sampler}_step{loaded.step}_seed{args.seed}_n{args.num}"
    if loaded.weights == "model":
        stem += "_model-weights"
    from qcsbm.evaluation import SAMPLES_DIR_NAME

    folder = Path(args.workdir) / SAMPLES_DIR_NAME
    return folder / stem if sharded else folder / f"{stem}.npz"


# --- sampling -------------------------------------------------------------------------------

def _block_sampler(loaded, sampler: str, settings: dict, device):
    """Return sample_block(count, generator) -> (uint8 images, nfe) for the run's model."""
    from qcsbm.evaluation import samples_to_images
    from qcsbm.sampling import ode_sample, pc_sample

    shape_tail = tuple(loaded.data["image_shape"])

    def sample_block(count: int, generator):
        shape = (count, *shape_tail)
        if sampler == "pc":
            result = pc_sample(loaded.score_model, loaded.sde, shape,
                               num_steps=settings["num_steps"],
                               predictor=settings["predictor"],
                               corrector=settings["corrector"],
                               # pc_sample reads snr only with a corrector; None is stored then.
                               snr=settings["snr"] if settings["snr"] is not None else 0.16,
                               corrector_steps=settings["corrector_steps"],
                               denoise=settings["denoise"], generator=generator, device=device)
        else:
            result = ode_sample(loaded.score_model, loaded.sde, shape, rtol=settings["rtol"],
                                atol=settings["atol"], method=settings["method"],
                                max_nfe=settings["max_nfe"], denoise=settings["denoise"],
                                generator=generator, device=device)
        _check_finite_samples(result.samples, loaded)
        return samples_to_images(result.samples, loaded.data), result.nfe

    return sample_block


def _check_finite_samples(samples, loaded) -> None:
    """Raise NonFiniteError when a sample contains NaN or inf, before anything is written.

    Converting such values to uint8 would give black pixels that look like images and would
    skew any metric computed from them.
    """
    import torch

    from qcsbm.errors import NonFiniteError

    bad = int((~torch.isfinite(samples.flatten(start_dim=1))).any(dim=1).sum())
    if bad:
        raise NonFiniteError(f"{bad} of {samples.shape[0]} samples contain NaN or inf values; "
                             f"check the weights of checkpoint {loaded.checkpoint_path} (for "
                             "example with --use-model-weights) or the sampler's settings")


def _save_with_grid(path: Path, samples) -> None:
    from qcsbm.evaluation import save_image_grid
    from qcsbm.sample_shards import save_samples

    save_samples(path, samples)
    if samples.images.shape[0]:
        save_image_grid(samples.images, path.with_suffix(".png"))


def _sample_whole(out: Path, job: dict, sample_block, *, progress: bool) -> int:
    from qcsbm.sample_shards import block_ranges, sample_blocks

    blocks = range(len(block_ranges(job["num_samples"], job["batch_size"])))
    samples = sample_blocks(sample_block, job, blocks, progress=progress)
    samples.metadata["shard"] = None
    _save_with_grid(out, samples)
    print(f"qcsbm sample: wrote {len(samples.indices)} samples to {out} (mean NFE "
          f"{samples.metadata['nfe_mean']:.1f})", file=sys.stderr)
    return 0


def _sample_shard(out: Path, job: dict, sample_block, shard: tuple[int, int], *, context,
                  progress: bool) -> int:
    """Sample one shard into the shard folder `out`; under torchrun, rank 0 then merges."""
    from qcsbm.sample_shards import (block_ranges, finished_shard, prepare_shard_folder,
                                     sample_blocks, save_samples, shard_blocks, shard_path)

    index, count = shard
    prepare_shard_folder(out, job, count)
    path = shard_path(out, index, count)
    if finished_shard(out, index, count, job):
        logger.info("shard %d/%d is already complete in %s; skipping it", index, count, path)
    else:
        num_blocks = len(block_ranges(job["num_samples"], job["batch_size"]))
        samples = sample_blocks(sample_block, job, shard_blocks(num_blocks, index, count),
                                progress=progress)
        samples.metadata["shard"] = {"index": index, "count": count}
        save_samples(path, samples)
        logger.info("wrote shard %d/%d with %d samples to %s", index, count,
                    len(samples.indices), path)

    if context is not None:
        # NOTE: a rank that fails before this point leaves the others waiting here until
        # the process group's timeout (init_distributed's timeout_s).
        context.barrier()
        return _merge(out, None) if context.is_main_process else 0
    print(f"qcsbm sample: wrote shard {index}/{count} to {path}; once every shard is done, "
          f"run `qcsbm sample merge {out}`", file=sys.stderr)
    return 0


def _check_not_overwriting(out: Path, overwrite: bool) -> None:
    """Raise UsageError if the sample file or its PNG grid exists and overwrite is off."""
    from qcsbm.errors import UsageError

    for path in (out, out.with_suffix(".png")):
        if path.exists() and not overwrite:
            raise UsageError(f"output file {str(path)!r} already exists; pass --overwrite to "
                             "replace it or choose another --out")


def _merge(directory: Path, out, overwrite: bool = False) -> int:
    from qcsbm.sample_shards import MERGED_NAME, merge_shards

    path = Path(out) if out else directory / MERGED_NAME
    _check_not_overwriting(path, overwrite)
    samples = merge_shards(directory)
    _save_with_grid(path, samples)
    print(f"qcsbm sample: merged {samples.metadata['merged_shards']} shards with "
          f"{len(samples.indices)} samples into {path}", file=sys.stderr)
    return 0
