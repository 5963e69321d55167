"""Inception-v3 features for FID, IS, KID and PRDC, through torch-fidelity.

Published FID / IS / KID numbers use one network: the TensorFlow Inception-v3 graph of
2015-12-05 that the original FID code uses, fed uint8 RGB images resized bilinearly to
299 x 299 as TensorFlow 1.x does. torch-fidelity (Obukhov et al.) ports that graph to PyTorch,
with weights converted from the TensorFlow ones and a TensorFlow 1.x compatible resize. This
module builds that network and nothing else: weights come from a path or from torch's hub
cache, and a missing file is an error, never a reason to use other weights.

Features are the 2048-D pool3 activations (FID, KID, PRDC). Logits are the 1008 class scores
without the final bias, the layer that torch-fidelity 0.4.0 uses for the Inception Score.

A feature extractor here is any `nn.Module` with a `name` string whose forward maps uint8
images (B, 3, H, W) to (features (B, D), logits (B, C)). `InceptionV3Features` is the only one
for reportable numbers. Tests pass small stand-ins to run the whole pipeline without the
weights file. Their scores are not comparable to published ones.

torch-fidelity is needed (tested with 0.4.0 only). Its package `__init__` imports torchvision,
and the PyPI build of torchvision 0.28.0 fails to load beside torch 2.13.0+cpu ("operator
torchvision::nms does not exist"). So only its Inception module is imported here, and
torchvision is not needed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qcsbm.errors import CheckpointError, UsageError
from qcsbm.metrics._arrays import check_int_at_least

INCEPTION_NAME = "inception-v3-fid"

# torch-fidelity 0.4.0's URL_INCEPTION_V3: the TensorFlow FID graph's weights converted by its
# authors. Kept here so that a missing file is reported without importing torch-fidelity.
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
TORCH_FIDELITY_INSTALL = "pip install --no-deps torch-fidelity"

logger = logging.getLogger(__name__)


class InceptionV3Features(nn.Module):
    """The FID Inception-v3 network: uint8 images (B, 3, H, W) -> pool3 features, logits.

    Args:
        weights_path: torch-fidelity's converted weights file
            (weights-inception-2015-12-05-6726825d.pth). None looks in torch's hub cache,
            `torch.hub.get_dir()/checkpoints`, where torch-fidelity itself stores it.
        download: fetch the file into the hub cache when `weights_path` is None and the cache
            has no copy.

    Raises UsageError when the file is missing and cannot be downloaded, and CheckpointError
    when it is not a state dict of this network.
    """

    name = INCEPTION_NAME

    def __init__(self, weights_path: str | Path | None = None, *, download: bool = True):
        super().__init__()
        path = inception_weights_path(weights_path, download=download)
        module = _torch_fidelity_inception_module()
        state_dict = _load_state_dict(path)
        self.network = _build_network(module, state_dict, path)

        # NOTE: the file is checked only for the architecture's keys and shapes, not against
        # a published hash. Its sha256 goes into reference statistics and results instead.
        self.weights_sha256 = _sha256(path)
        logger.info("loaded Inception-v3 weights %s (sha256 %s)", path, self.weights_sha256)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.network(images)
        return features, logits

    def train(self, mode: bool = True) -> InceptionV3Features:
        """Keep evaluation mode: batch norm must use the stored statistics, never the batch's."""
        return super().train(False)


def inception_weights_path(weights_path: str | Path | None = None, *,
                           download: bool = True) -> Path:
    """Return the path of the Inception-v3 weights file, downloading it if allowed.

    Raises UsageError naming the file and where to put it when it is missing.
    """
    url, file_name = INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_FILE
    cache_path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    where = (f"download {url} and pass its path as the Inception weights path, or put it at "
             f"{cache_path}")

    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UsageError(f"Inception weights file not found: {path}. To fix it, {where}")
        return path

    if cache_path.is_file():
        return cache_path
    if not download:
        raise UsageError(
            f"Inception weights file {file_name} not found in the cache {cache_path.parent} "
            f"and download is off. To fix it, {where}")

    logger.info("downloading Inception-v3 weights from %s to %s", url, cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cache_path), progress=False)
    except OSError as error:
        raise UsageError(
            f"Inception weights file {file_name} is not in the cache and its download failed "
            f"({error}). To fix it, {where}") from error
    return cache_path


def untrained_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a state dict of the FID Inception-v3 architecture with random weights.

    For tests and speed benchmarks of the real network code only: its features carry no
    meaning, and scores computed with it must never be reported.
    """
    module = _torch_fidelity_inception_module()
    network_class = module.FeatureExtractorInceptionV3

    # The constructor always loads weights, so both loading steps are skipped here.
    with torch.random.fork_rng(devices=[]), \
            mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(network_class, "load_state_dict",
                              lambda self, state_dict, *args, **kwargs: None):
        torch.manual_seed(seed)
        network = network_class("inception-v3-compat", ["2048", "logits_unbiased"])
    return network.state_dict()


def images_to_tensor(images) -> torch.Tensor:
    """Convert uint8 images (N, H, W, C) with C = 1 or 3 to a uint8 tensor (N, 3, H, W).

    Grayscale images are repeated over three channels, the usual practice for FID on MNIST.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UsageError(
            f"images must have dtype uint8 (values 0..255), got {images.dtype}; quantize "
            "samples with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in [0, 1]")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(
            f"images must have shape (N, H, W, C) with C = 1 or 3, got shape {images.shape}")

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.contiguous()


def extract_features(images, extractor: nn.Module, *, batch_size: int = 100,
                     device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run `extractor` over uint8 images and return features (N, D) and logits (N, C).

    Args:
        images: one array (N, H, W, C) or an iterable of such arrays (batches of any size).
        extractor: a feature extractor as described in the module docstring, on `device`.
        batch_size: images per forward pass.
        progress: show a tqdm bar over images.

    Both outputs are float32, as the networks compute them.
    """
    check_int_at_least("batch_size", batch_size, 1)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total, chunks = len(images), [images]
    else:
        total, chunks = None, images

    features, logits = [], []
    with torch.no_grad(), tqdm(total=total, unit="img", desc="features",
                               disable=not progress) as bar:
        for chunk in _iterate(chunks):
            tensor = images_to_tensor(chunk)
            for start in range(0, tensor.shape[0], batch_size):
                batch = tensor[start:start + batch_size].to(device)
                batch_features, batch_logits = extractor(batch)
                features.append(batch_features.float().cpu().numpy())
                logits.append(batch_logits.float().cpu().numpy())
                bar.update(batch.shape[0])

    if not features:
        raise UsageError("images is empty; pass at least one image")
    return np.concatenate(features), np.concatenate(logits)


def default_extractor(weights_path: str | Path | None = None, *, download: bool = True,
                      device: str | torch.device = "cpu") -> InceptionV3Features:
    """Build the FID Inception-v3 network on `device` in evaluation mode."""
    return InceptionV3Features(weights_path, download=download).to(device).eval()


def extractor_identity(extractor: nn.Module) -> tuple[str, str]:
    """Return (name, weights sha256 or "") that identify an extractor's features."""
    name = getattr(extractor, "name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(
            f"feature extractor {type(extractor).__name__} has no `name` string; set one so "
            "that statistics from different extractors are never mixed")
    return name, getattr(extractor, "weights_sha256", "") or ""


def _iterate(chunks) -> Iterable:
    if not isinstance(chunks, Iterable):
        raise UsageError(
            f"images must be an array (N, H, W, C) or an iterable of arrays, got "
            f"{type(chunks).__name__}")
    return chunks


def _torch_fidelity_inception_module() -> ModuleType:
    """Import torch-fidelity's Inception-v3 module without running the package `__init__`.

    The package `__init__` imports every feature extractor, and the CLIP one imports
    torchvision. A bare package object replaces the package while the one module is imported,
    and is removed again, so a later plain `import torch_fidelity` still runs the real `__init__`.
    """
    module_name = "torch_fidelity.feature_extractor_inceptionv3"
    if module_name in sys.modules:
        return sys.modules[module_name]

    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise UsageError(
            f"Inception features need the torch-fidelity package, which is not installed; "
            f"install it with `{TORCH_FIDELITY_INSTALL}` (it needs no torchvision here)")
    if "torch_fidelity" in sys.modules:
        module = importlib.import_module(module_name)
    else:
        package = importlib.util.module_from_spec(spec)
        sys.modules["torch_fidelity"] = package
        try:
            module = importlib.import_module(module_name)
        finally:
            if sys.modules.get("torch_fidelity") is package:
                del sys.modules["torch_fidelity"]

    for attribute in ("FeatureExtractorInceptionV3", "load_state_dict_from_url"):
        if not hasattr(module, attribute):
            raise UsageError(
                f"the installed torch-fidelity has no {module_name}.{attribute}; qcsbm was "
                "tested with torch-fidelity 0.4.0, install that version")
    return module


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"Inception weights file {path} cannot be loaded as plain tensors ({error}); "
            "download it again") from error
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"Inception weights file {path} contains a {type(state_dict).__name__}, not a "
            "state dict; download it again")
    return state_dict


def _build_network(module: ModuleType, state_dict: dict, path: Path) -> nn.Module:
    """Build torch-fidelity's FeatureExtractorInceptionV3 from an already loaded state dict."""
    # torch-fidelity 0.4.0 reads a weights file with torch.load(weights_only=False), which
    # can run code stored in the file. Its loader is replaced here by one that returns the
    # state dict loaded above with weights_only=True.
    loader = mock.patch.object(module, "load_state_dict_from_url",
                               lambda *args, **kwargs: state_dict)
    try:
        with loader:
            return module.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"])
    except RuntimeError as error:
        raise CheckpointError(
            f"Inception weights file {path} does not match torch-fidelity's FID Inception-v3 "
            f"({error}); download {INCEPTION_WEIGHTS_URL} again") from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
