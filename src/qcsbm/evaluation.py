"""Evaluation of a trained run: images from samples, bits per dimension, asymmetry by noise
level, sample quality, and the run's metrics.json.

From the SDE's data range to 8-bit pixels (`samples_to_images`), with L the data set's own
number of levels and (scale, shift) the run's input scaling x = scale * y + shift:

    y = (x - shift) / scale                       back to [0, 1]
    k = clip(floor(L y), 0, L - 1)                levels, for a model trained on dequantized
                                                  data (k + u) / L
    k = clip(round((L - 1) y), 0, L - 1)          levels, for a model trained on k / (L - 1)
    pixel = round(255 k / (L - 1))                0..255; the identity for 8-bit data, and
                                                  for the 17-level digits 0, 16, 32, ..., 255

Reference images for sample quality go through the same level-to-pixel map.

Bits per dimension (`nll_of_run`): test images k are dequantized uniformly, y = (k + u) / L,
mapped to the model's input x = scale * y + shift, and scored by the probability-flow ODE.
`qcsbm.likelihood.bits_per_dim` then adds log2(L) - log2(scale) bits (8 for 8-bit data in
[0, 1], 7 for 8-bit data centered to [-1, 1], log2(17) = 4.09 for the digits in [0, 1]), so
the result bounds the discrete data's bits per dimension from above in expectation.

metrics.json in the run folder is a JSON list; `append_metrics` adds one entry per
evaluation and never changes earlier entries.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qcsbm.checkpoints import write_text_atomic
from qcsbm.errors import UsageError

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
SAMPLES_DIR_NAME = "samples"

#: Pixel values of the written images: 8 bits, 0..255.
PIXEL_MAX = 255

#: Sources whose files carry no split: the test images must be given by path.
FILE_SOURCES = ("npz", "folder")


# --- images ---------------------------------------------------------------------------------

def levels_to_pixels(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """Map integer levels 0..L-1 to uint8 pixels round(255 k / (L - 1))."""
    pixels = np.rint(np.asarray(levels, dtype=np.float64) * PIXEL_MAX / (num_levels - 1))
    return pixels.astype(np.uint8)


def samples_to_images(x: torch.Tensor, data: dict) -> np.ndarray:
    """Quantize samples (B, C, H, W) in the SDE's data range to uint8 images (B, H, W, C).

    `data` is `LoadedRun.data`: "scale", "shift", "num_levels" and "dequantize" (see the
    module docstring for the mapping).
    """
    num_levels = int(data["num_levels"])
    y = (x.detach().to("cpu", torch.float64) - data["shift"]) / data["scale"]
    if data.get("dequantize", False):
        levels = torch.floor(y * num_levels)
    else:
        levels = torch.round(y * (num_levels - 1))
    levels = levels.nan_to_num(0.0).clamp(0, num_levels - 1)
    return levels_to_pixels(levels.permute(0, 2, 3, 1).numpy(), num_levels)


def dataset_pixels(dataset) -> np.ndarray:
    """Return the images of an `ImageDataset` as uint8 pixels (N, H, W, C)."""
    levels = dataset.levels.permute(0, 2, 3, 1).numpy()
    return levels_to_pixels(levels, dataset.num_levels)


def save_image_grid(images: np.ndarray, path, *, max_images: int = 64,
                    min_tile: int = 32) -> Path:
    """Write up to `max_images` uint8 images (N, H, W, C) as one PNG grid.

    Tiles smaller than `min_tile` pixels are enlarged by an integer factor (nearest
    neighbour), so that 8x8 digits stay visible.
    """
    from PIL import Image

    images = np.asarray(images)[:max_images]
    if images.shape[0] == 0:
        raise UsageError("no images to put into a grid")
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pad = 1
    grid = np.zeros((rows * (height + pad) + pad, columns * (width + pad) + pad, channels),
                    dtype=np.uint8)
    for position, image in enumerate(images):
        row, column = divmod(position, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        grid[top:top + height, left:left + width] = image

    factor = max(1, math.ceil(min_tile / min(height, width)))
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor),
                                 Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


# --- metrics.json ---------------------------------------------------------------------------

def read_metrics(workdir) -> list:
    """Return the entries of the run's metrics.json, or [] if it does not exist."""
    path = Path(workdir) / METRICS_NAME
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path}: {error}; repair it or move it away (it was "
                         "left unchanged)") from None
    if not isinstance(entries, list):
        raise UsageError(f"invalid {path}: expected a JSON list of evaluation entries")
    return entries


def append_metrics(workdir, entry: dict) -> Path:
    """Append one entry to the run's metrics.json (written atomically) and return its path."""
    entries = read_metrics(workdir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
    entries.append(entry)
    path = Path(workdir) / METRICS_NAME
    write_text_atomic(path, json.dumps(entries, indent=2) + "\n")
    logger.info("appended %s results to %s", entry.get("metric"), path)
    return path


def run_summary(run) -> dict:
    """Return the fields that identify the model of a `LoadedRun` in an evaluation entry."""
    return {"step": run.step, "weights": run.weights, "checkpoint": str(run.checkpoint_path),
            "kind": run.config.training.kind}


# --- evaluation images ----------------------------------------------------------------------

def load_eval_images(cfg, split: str = "test", data_path=None):
    """Load the run's data set for evaluation.

    Args:
        cfg: the run's `TrainConfig`.
        split: "train" or "test" for named data sets.
        data_path: root of the files; defaults to cfg.data.path. For the file sources
            ("npz", "folder") it must point at the split's own files.
    """
    from qcsbm.data.images import load_images

    root = data_path if data_path is not None else cfg.data.path
    name = cfg.data.dataset
    if name in FILE_SOURCES:
        if data_path is None:
            raise UsageError(f"data set {name!r} has no splits; pass --data-path with the "
                             f"{split} images")
        dataset = load_images(name, root=root, channels=cfg.data.num_channels)
    else:
        dataset = load_images(name, root=root, split=split, channels=cfg.data.num_channels)

    _, height, width = dataset.image_shape
    if (height, width) != (cfg.data.image_size, cfg.data.image_size):
        raise UsageError(f"data set {dataset.name} has images of {height}x{width} pixels, but "
                         f"the run was trained on {cfg.data.image_size}x{cfg.data.image_size}")
    return dataset


def _first(dataset, num: int | None) -> int:
    if num is None:
        return len(dataset)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UsageError(f"invalid --num {num!r}; expected an integer >= 1")
    if num > len(dataset):
        raise UsageError(f"invalid --num {num}: data set {dataset.name} has only "
                         f"{len(dataset)} images")
    return num


# --- bits per dimension ---------------------------------------------------------------------

def nll_of_run(run, dataset, *, num: int | None = None, batch_size: int = 64,
               divergence: str = "hutchinson", num_probes: int = 1, seed: int = 0,
               rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
               device="cpu", progress: bool = False) -> dict:
    """Return bits per dimension of the first `num` images of `dataset` under the run's model.

    See the module docstring for the dequantization and the offset. One generator seeded
    with `seed` draws the dequantization noise and the Hutchinson probes.

    Returns a dict with "bits_per_dim" (mean), "bits_per_dim_stderr", "nfe_mean",
    "num_samples", "num_dims", "offset_bits" and the settings used.
    """
    from qcsbm.likelihood import bits_per_dim, log_likelihood

    num = _first(dataset, num)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"invalid --batch-size {batch_size!r}; expected an integer >= 1")
    scale, shift = run.data["scale"], run.data["shift"]
    num_levels = dataset.num_levels
    generator = torch.Generator().manual_seed(seed)

    values, nfes = [], []
    for start in tqdm(range(0, num, batch_size), desc="bits/dim", disable=not progress):
        indices = list(range(start, min(start + batch_size, num)))
        y = dataset.images(indices, dequantize=True, generator=generator)
        x = (scale * y + shift).to(device)
        result = log_likelihood(run.score_model, run.sde, x, divergence=divergence,
                                num_probes=num_probes, generator=generator, rtol=rtol,
                                atol=atol, method=method)
        values.append(bits_per_dim(result.logp.cpu().double(), dataset.num_dims,
                                   num_levels=num_levels, data_scale=scale))
        nfes.append((result.nfe, len(indices)))

    bpd = torch.cat(values)
    stderr = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else None
    return {
        "metric": "nll", "bits_per_dim": float(bpd.mean()), "bits_per_dim_stderr": stderr,
        "nfe_mean": sum(nfe * count for nfe, count in nfes) / num, "num_samples": num,
        "num_dims": dataset.num_dims, "num_levels": num_levels, "data_scale": scale,
        "offset_bits": math.log2(num_levels) - math.log2(scale), "dataset": dataset.name,
        "divergence": divergence, "num_probes": num_probes if divergence == "hutchinson" else None,
        "rtol": rtol, "atol": atol, "method": method, "seed": seed, "batch_size": batch_size,
    }


# --- asymmetry by noise level ---------------------------------------------------------------

def asymmetry_of_run(run, dataset, *, num: int | None = 64, num_levels: int = 10,
                     num_probes: int = 1, seed: int = 0, batch_size: int = 64,
                     device="cpu") -> dict:
    """Return Asym and NAsym of the run's score at `num_levels` noise levels.

    The first `num` images (scaled as in training, dequantized if the run was) are perturbed
    with the same noise z at every level, x_t = mean(t) x_0 + std(t) z, and the asymmetry
    terms use `num_probes` Rademacher (Hutchinson) probes per point. `asym_mean` and
    `nasym_mean` average the levels, as the paper's tables do.
    """
    from qcsbm.metrics.score_field import asymmetry_by_level, noise_level_times

    num = _first(dataset, num)
    generator = torch.Generator().manual_seed(seed)
    y = dataset.images(list(range(num)), dequantize=bool(run.data.get("dequantize")),
                       generator=generator)
    x0 = (run.data["scale"] * y + run.data["shift"]).to(device)
    times = noise_level_times(run.sde, num_levels, dtype=torch.float32)
    levels = asymmetry_by_level(run.score_model, run.sde, x0, times, method="hutchinson",
                                num_probes=num_probes, generator=generator,
                                batch_size=batch_size)
    return {
        "metric": "asym", "times": levels.times, "std": levels.std, "asym": levels.asym,
        "nasym": levels.nasym, "asym_mean": sum(levels.asym) / num_levels,
        "nasym_mean": sum(levels.nasym) / num_levels, "num_samples": num, "num_noise_levels": num_levels,
        "num_probes": num_probes, "estimator": "hutchinson", "seed": seed,
        "dataset": dataset.name,
    }


def plot_asymmetry(result: dict, path, *, title: str = "") -> Path:
    """Plot Asym and NAsym against the noise std (log scale) into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, label in ((axes[0], "asym", "Asym"), (axes[1], "nasym", "NAsym")):
        axis.plot(result["std"], result[key], marker="o")
        axis.set_xscale("log")
        axis.set_xlabel("noise std(t)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- sample quality -------------------------------------------------------------------------

def reference_key(cfg, split: str) -> str:
    """Return the cache key of reference statistics for a split of the run's data set."""
    key = f"{cfg.data.dataset}-{split}-{cfg.data.image_size}px"
    if cfg.data.path is not None:
        import hashlib

        key += "-" + hashlib.sha256(str(Path(cfg.data.path).resolve()).encode()).hexdigest()[:8]
    return key


def sample_quality_of_run(images: np.ndarray, reference, *, extractor=None,
                          weights_path=None, download: bool = False, nearest_k: int = 3,
                          device="cpu", progress: bool = False, seed: int = 0) -> dict:
    """Return FID, IS, KID and PRDC of uint8 samples (N, H, W, C) from one feature pass.

    `extractor` None uses the FID Inception-v3 network, whose weights file must exist (see
    `qcsbm.metrics.inception_weights_path`). Any other extractor is a test hook: its scores
    are not comparable to published ones.
    """
    from qcsbm.metrics import compute_sample_quality

    num_samples = images.shape[0]
    return compute_sample_quality(
        images, reference, extractor=extractor, weights_path=weights_path,
        download=download, k=nearest_k, is_splits=min(10, num_samples),
        kid_subset_size=min(1000, num_samples), device=device, progress=progress, seed=seed)


def newest_samples(workdir) -> Path:
    """Return the newest .npz file in the run's samples folder."""
    folder = Path(workdir) / SAMPLES_DIR_NAME
    candidates = sorted(folder.glob("*.npz"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UsageError(f"no sample file in {folder}; draw samples with `qcsbm sample "
                         f"--workdir {workdir} ...` or pass the samples explicitly")
    return candidates[-1]


def quality_of_run(workdir, *, samples=None, ref: str = "train", ref_stats=None,
                   inception_weights=None, cache_dir=None, nearest_k: int = 3,
                   data_path=None, device="cpu", progress: bool = False,
                   extractor=None) -> dict:
    """Compute FID, IS, KID and PRDC of a run's samples and append them to its metrics.json.

    Args:
        workdir: the run folder; its config.json names the data set of the reference.
        samples: a sample file or shard folder of `qcsbm sample`; None for the newest .npz in
            workdir/samples.
        ref: the split ("train" or "test") of the run's data set whose statistics are the
            reference, computed once and cached in `cache_dir` (default
            ~/.cache/qcsbm/reference).
        ref_stats: a statistics file of `qcsbm.metrics.reference_stats`, used instead of `ref`.
        inception_weights: torch-fidelity's Inception-v3 weights file; None looks in torch's
            hub cache. Nothing is downloaded, and a missing file raises UsageError that names
            the file and where to put it.
        extractor: test hook. None uses Inception-v3; a stand-in `nn.Module` (see
            `qcsbm.metrics.inception`) replaces it, and then no weights file is needed. Its
            scores are not comparable to published ones.

    Returns the appended entry, with "metrics_file" added.
    """
    from qcsbm.config import TrainConfig, load_json
    from qcsbm.metrics import ReferenceStats, inception_weights_path, reference_stats
    from qcsbm.runs import CONFIG_NAME, is_run_dir
    from qcsbm.sample_shards import read_samples

    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise UsageError(f"run directory {workdir} is not a qcsbm run (it has no run marker); "
                         "pass the --workdir of a `qcsbm train` run")
    if isinstance(nearest_k, bool) or not isinstance(nearest_k, int) or nearest_k < 1:
        raise UsageError(f"invalid nearest_k {nearest_k!r}; expected an integer >= 1")
    read_metrics(workdir)  # a damaged metrics.json fails before the feature pass

    # Fail on missing input files first, then on a missing weights file, before long work.
    if ref_stats is not None and not Path(ref_stats).is_file():
        raise UsageError(f"reference statistics file {str(ref_stats)!r} not found; pass a "
                         "file written by qcsbm.metrics.reference_stats or use --ref")
    samples_path = Path(samples) if samples is not None else newest_samples(workdir)
    sample_set = read_samples(samples_path)
    weights = None
    if extractor is None:
        weights = inception_weights_path(inception_weights, download=False)
    job = sample_set.metadata.get("job", {})
    if job.get("workdir") and Path(job["workdir"]) != workdir.resolve():
        logger.warning("the samples in %s come from the run %s, not %s", samples_path,
                       job["workdir"], workdir)

    if ref_stats is not None:
        reference, reference_name = ReferenceStats.load(ref_stats), str(ref_stats)
    else:
        cfg = load_json(TrainConfig, workdir / CONFIG_NAME)
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "qcsbm" / "reference"
        dataset = load_eval_images(cfg, ref, data_path)
        reference = reference_stats(dataset_pixels(dataset), reference_key(cfg, ref), cache,
                                    extractor, weights_path=weights, download=False,
                                    device=device, progress=progress)
        reference_name = f"{cfg.data.dataset}:{ref}"

    result = sample_quality_of_run(sample_set.images, reference, extractor=extractor,
                                   weights_path=weights, nearest_k=nearest_k, device=device,
                                   progress=progress)
    entry = {"metric": "quality", **result, "reference": reference_name,
             "samples": str(samples_path), "sampler": job.get("sampler"),
             "sampler_settings": job.get("settings"),
             "nfe_mean": sample_set.metadata.get("nfe_mean"),
             "step": job.get("checkpoint_step"), "weights": job.get("weights"),
             "checkpoint": job.get("checkpoint"), "seed": job.get("seed")}
    path = append_metrics(workdir, entry)
    return {**entry, "metrics_file": str(path)}
