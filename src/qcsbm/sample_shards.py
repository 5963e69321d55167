"""Sample files, reproducible sample blocks, and sharded sampling with a checked merge.

Blocks: the requested N samples are cut into blocks of `batch_size` samples (the last may be
smaller). Block b holds the samples with global indices b * batch_size .. and is drawn as one
batch from a generator seeded from (seed, b) alone. So sample i depends only on the seed,
the batch size and i, and the union of the shards equals one unsharded run with the same
seed and batch size, whatever the number of shards. (The batch size matters: the
predictor-corrector step size and the adaptive ODE step are shared by a batch.)

Shards: shard i of n takes the contiguous blocks floor(i B / n) .. floor((i + 1) B / n) - 1
of the B blocks. A shard folder contains

    manifest.json                    the job: checkpoint, sampler settings, seed, counts
    shard_<i>-of-<n>.npz             one sample file per shard (5-digit numbers)
    samples.npz, samples.png         the merged samples, once `merge_shards` has run

A sample file (`save_samples`) is an .npz archive readable with allow_pickle=False:

    images      uint8 (N, H, W, C), pixel values 0..255 (see `qcsbm.evaluation`)
    indices     int64 (N,), the global sample indices
    metadata    a JSON string: the job, the shard, the NFE of each block
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np

from qcsbm.checkpoints import write_atomic, write_text_atomic
from qcsbm.data.images_loader import seeded_generator
from qcsbm.errors import UsageError

logger = logging.getLogger(__name__)

SAMPLES_FORMAT = "qcsbm-samples"
MANIFEST_NAME = "manifest.json"
MERGED_NAME = "samples.npz"
SHARD_PATTERN = re.compile(r"shard_(\d{5})-of-(\d{5})\.npz")

# Leading seed word that keeps sample blocks apart from the data loader's streams.
_SAMPLE_STREAM = 2


@dataclasses.dataclass
class SampleSet:
    """Samples as uint8 images with their global indices and the metadata of the job."""

    images: np.ndarray  # uint8 (N, H, W, C)
    indices: np.ndarray  # int64 (N,)
    metadata: dict


# --- sample files ---------------------------------------------------------------------------

def save_samples(path, samples: SampleSet) -> Path:
    """Write a sample file atomically (see the module docstring for its entries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = json.dumps({"format": SAMPLES_FORMAT, **samples.metadata}, sort_keys=True)

    def write(file):
        np.savez(file, images=samples.images, indices=samples.indices.astype(np.int64),
                 metadata=np.array(metadata))

    return write_atomic(path, write)


def load_samples(path) -> SampleSet:
    """Read a sample file written by `save_samples`; raise UsageError for any other file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sample file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, indices = archive["images"], archive["indices"]
            metadata = json.loads(str(archive["metadata"]))
    except (OSError, KeyError, ValueError) as error:
        raise UsageError(f"invalid sample file {path}: {error}; expected an .npz file written "
                         "by `qcsbm sample`") from None
    if not isinstance(metadata, dict) or metadata.pop("format", None) != SAMPLES_FORMAT:
        raise UsageError(f"invalid sample file {path}: its metadata has no "
                         f"{SAMPLES_FORMAT!r} format marker")
    if images.dtype != np.uint8 or images.ndim != 4 or indices.shape != images.shape[:1]:
        raise UsageError(f"invalid sample file {path}: expected uint8 images (N, H, W, C) and "
                         f"N indices, found {images.dtype} {images.shape} and indices "
                         f"{indices.shape}")
    return SampleSet(images=images, indices=indices, metadata=metadata)


# --- blocks and shards ----------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """Parse "i/n" into (i, n) with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if match is None:
        raise UsageError(f"invalid --shard {text!r}; expected INDEX/COUNT such as 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"invalid --shard {text!r}; expected 0 <= INDEX < COUNT and COUNT >= 1")
    return index, count


def block_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """Return the (start, stop) global sample indices of every block."""
    return [(start, min(start + batch_size, num_samples))
            for start in range(0, num_samples, batch_size)]


def shard_blocks(num_blocks: int, index: int, count: int) -> range:
    """Return the block numbers of shard `index` of `count` (contiguous, sizes differ by <= 1)."""
    return range(index * num_blocks // count, (index + 1) * num_blocks // count)


def block_generator(seed: int, block: int):
    """Return the CPU torch.Generator of block `block`, seeded from (seed, block) alone."""
    return seeded_generator(_SAMPLE_STREAM, seed, block)


def shard_path(directory, index: int, count: int) -> Path:
    """Return the sample file of shard `index` of `count` in a shard folder."""
    return Path(directory) / f"shard_{index:05d}-of-{count:05d}.npz"


def sample_blocks(sample_block, job: dict, blocks, *, progress: bool = False) -> SampleSet:
    """Draw the given blocks of a job and return their samples in index order.

    Args:
        sample_block: `sample_block(count, generator) -> (uint8 images (count, H, W, C), nfe)`.
        job: the job settings; "num_samples", "batch_size" and "seed" are read here.
        blocks: the block numbers to draw.
        progress: show a progress bar over the blocks.
    """
    from tqdm.auto import tqdm

    ranges = block_ranges(job["num_samples"], job["batch_size"])
    images, indices, nfe_blocks = [], [], []
    for block in tqdm(list(blocks), desc="sample blocks", disable=not progress):
        start, stop = ranges[block]
        block_images, nfe = sample_block(stop - start, block_generator(job["seed"], block))
        images.append(block_images)
        indices.append(np.arange(start, stop, dtype=np.int64))
        nfe_blocks.append({"block": block, "num_samples": stop - start, "nfe": int(nfe)})
        logger.debug("block %d: samples %d..%d, nfe %d", block, start, stop - 1, nfe)

    metadata = {"job": job, "blocks": nfe_blocks, "nfe_mean": _nfe_mean(nfe_blocks)}
    if not images:
        return SampleSet(np.zeros((0, 0, 0, 0), np.uint8), np.zeros(0, np.int64), metadata)
    return SampleSet(np.concatenate(images), np.concatenate(indices), metadata)


def _nfe_mean(blocks: list[dict]) -> float | None:
    """Return the NFE per sample averaged over samples (a block's NFE counts for each sample)."""
    total = sum(item["num_samples"] for item in blocks)
    if total == 0:
        return None
    return sum(item["nfe"] * item["num_samples"] for item in blocks) / total


# --- sharded jobs ---------------------------------------------------------------------------

def prepare_shard_folder(directory, job: dict, count: int) -> Path:
    """Create the shard folder and its manifest, or check an existing manifest against `job`.

    Raises UsageError when the folder contains a manifest of another job or shard count, so
    that shards of different jobs are never mixed.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"invalid --out {directory}: a sharded run writes a folder, and this "
                         "path is a file")
    manifest = {"format": "qcsbm-sample-shards", "num_shards": count, "job": job}
    path = directory / MANIFEST_NAME
    if path.is_file():
        existing = _read_manifest(directory)
        _check_same_job(existing["job"], job, f"the shard folder {directory}")
        if existing["num_shards"] != count:
            raise UsageError(f"the shard folder {directory} was started with "
                             f"{existing['num_shards']} shards, not {count}; use another --out "
                             "or the same shard count")
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    # Every shard process may get here at once; they write the same content, atomically.
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def finished_shard(directory, index: int, count: int, job: dict) -> bool:
    """Return whether shard `index` of `count` is already complete for `job`."""
    path = shard_path(directory, index, count)
    if not path.is_file():
        return False
    try:
        samples = load_samples(path)
    except UsageError as error:
        logger.warning("sampling shard %d/%d again: %s", index, count, error)
        return False
    _check_same_job(samples.metadata.get("job"), job, f"shard file {path}")
    return True


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise UsageError(f"{directory} is not a shard folder: it has no {MANIFEST_NAME}; pass "
                         "the --out folder of a sharded `qcsbm sample` run")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        count, job = manifest["num_shards"], manifest["job"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"invalid shard manifest {path}: {error}") from None
    if not isinstance(count, int) or count < 1 or not isinstance(job, dict):
        raise UsageError(f"invalid shard manifest {path}: expected num_shards >= 1 and a job")
    return manifest


def _check_same_job(found, expected: dict, where: str) -> None:
    """Raise UsageError naming the first setting in which `found` differs from `expected`."""
    if found == expected:
        return
    if not isinstance(found, dict):
        raise UsageError(f"{where} has no job settings; it was not written by `qcsbm sample`")
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            raise UsageError(f"{where} belongs to another sampling job: {key} is "
                             f"{found.get(key)!r} there and {expected.get(key)!r} in this "
                             "run; use another --out folder or the same settings")


def merge_shards(directory) -> SampleSet:
    """Check a shard folder and return all its samples in index order.

    Raises UsageError when a shard is missing, a file belongs to another job or shard count,
    a shard file repeats sample indices of another, or the union is not 0..N-1.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    count, job = manifest["num_shards"], manifest["job"]

    present = {}
    for path in sorted(directory.glob("shard_*.npz")):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match is None:
            raise UsageError(f"unexpected file {path.name} in shard folder {directory}; shard "
                             "files are named shard_<index>-of-<count>.npz, so remove it")
        index, file_count = int(match.group(1)), int(match.group(2))
        if file_count != count or index >= count:
            raise UsageError(f"shard file {path.name} does not belong to the {count} shards of "
                             f"{directory}; remove it")
        present[index] = path

    missing = [index for index in range(count) if index not in present]
    if missing:
        shown = ", ".join(f"{index}/{count}" for index in missing[:10])
        raise UsageError(f"shard folder {directory} is missing {len(missing)} of {count} "
                         f"shards ({shown}); run `qcsbm sample` with --shard for each of them")

    return _combine(directory, [(path, load_samples(path)) for _, path in sorted(present.items())],
                    job, count)


def _combine(directory: Path, shards: list, job: dict, count: int) -> SampleSet:
    owner = {}
    images, indices, blocks = [], [], []
    for index, (path, samples) in enumerate(shards):
        _check_same_job(samples.metadata.get("job"), job, f"shard file {path.name}")
        if samples.metadata.get("shard") != {"index": index, "count": count}:
            raise UsageError(f"shard file {path.name} contains shard "
                             f"{samples.metadata.get('shard')}, not {index}/{count}; it was "
                             "copied or renamed, so remove it and sample that shard again")
        for sample_index in samples.indices.tolist():
            if sample_index in owner:
                raise UsageError(f"duplicate sample index {sample_index} in shard files "
                                 f"{owner[sample_index]} and {path.name}; remove the duplicate "
                                 "and sample that shard again")
            owner[sample_index] = path.name
        if len(samples.indices):
            images.append(samples.images)
            indices.append(samples.indices)
        blocks.extend(samples.metadata.get("blocks", []))

    expected = set(range(job["num_samples"]))
    if set(owner) != expected:
        absent = sorted(expected - set(owner))[:10]
        extra = sorted(set(owner) - expected)[:10]
        last = job["num_samples"] - 1
        raise UsageError(f"the shards in {directory} do not contain samples 0..{last} exactly "
                         f"(missing {absent}, unexpected {extra}); sample them again")

    all_indices = np.concatenate(indices)
    order = np.argsort(all_indices)
    metadata = {"job": job, "blocks": sorted(blocks, key=lambda item: item["block"]),
                "nfe_mean": _nfe_mean(blocks), "shard": None, "merged_shards": count}
    logger.info("merged %d shards with %d samples from %s", count, len(order), directory)
    return SampleSet(np.concatenate(images)[order], all_indices[order], metadata)


def read_samples(path) -> SampleSet:
    """Read a sample file, or merge the shards of a shard folder."""
    path = Path(path)
    if path.is_dir():
        return merge_shards(path)
    samples = load_samples(path)
    shard = samples.metadata.get("shard")
    if shard is not None:
        raise UsageError(f"{path} holds shard {shard['index']}/{shard['count']} only; pass its "
                         "shard folder so that all shards are merged")
    return samples
