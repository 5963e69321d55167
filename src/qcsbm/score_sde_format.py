"""Safe import of checkpoints written by yang-song/score_sde_pytorch and the QCSBM paper's fork.

Such a checkpoint is a `torch.save`d dict:

    model       the network's state dict. Keys carry the `module.` prefix of nn.DataParallel.
    ema         {"decay", "num_updates", "shadow_params"}. The shadow parameters form a list
                without names: one tensor per parameter with requires_grad True, in
                `model.parameters()` order.
    optimizer   the optimiser's state dict (Adam in every reference config).
    step        the training step. QCSBM-paper checkpoints do not store it.

The reference loads them with a full unpickle, which runs any code stored in the file. Here
every file goes through `torch.load(..., weights_only=True)`, which only rebuilds tensors and
plain containers.

The EMA list gets its names from the model state dict: its keys in order, minus the buffer
`sigmas` and the frozen Fourier frequencies `all_modules.0.W` (the only state-dict entries of
the reference score models that are not trainable parameters). EMA weights for those two
entries are taken from the model, as the reference's EMA `copy_to` leaves them untouched too.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping

import warnings

import torch
from torch import nn

from qcsbm.errors import CheckpointError

logger = logging.getLogger(__name__)

DATA_PARALLEL_PREFIX = "module."

# State-dict entries of the reference score models that the EMA does not track.
NON_TRAINABLE_KEYS = ("sigmas", "all_modules.0.W")

# At most this many names per category in a compatibility error.
MAX_LISTED_KEYS = 10


def load_score_sde_checkpoint(path) -> dict:
    """Load a score_sde_pytorch or QCSBM-paper checkpoint without running code stored in it.

    Returns:
        A dict with
            model: the state dict with the `module.` prefix removed;
            ema: a named state dict of the EMA weights (same keys as `model`);
            ema_decay, ema_num_updates: the EMA's stored settings (None if absent);
            optimizer: the optimiser state dict as stored, or None if absent;
            step: the training step as an int, or None if absent.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, truncated, refused by
            `weights_only` (for example a pickle that would run code), or its EMA list does not
            match the model's trainable parameters in number or shape.
    """
    path = os.fspath(path)
    checkpoint = _torch_load(path)

    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"invalid checkpoint {path!r}: expected a dict with keys 'model', "
                              f"'ema', 'optimizer' and optionally 'step', found {found}")
    model = strip_data_parallel_prefix(_tensor_dict(checkpoint["model"], path, "model"), path)

    if "ema" not in checkpoint:
        raise CheckpointError(f"invalid checkpoint {path!r}: the 'ema' entry is missing")
    ema_state = checkpoint["ema"]
    if not isinstance(ema_state, Mapping) or "shadow_params" not in ema_state:
        raise CheckpointError(f"invalid checkpoint {path!r}: 'ema' must be a dict with "
                              "'shadow_params', 'decay' and 'num_updates'")

    step = checkpoint.get("step")
    if step is None:
        logger.info("checkpoint %s stores no training step (as in QCSBM-paper checkpoints)", path)
    return {
        "model": model,
        "ema": ema_state_dict(model, ema_state["shadow_params"], path),
        "ema_decay": ema_state.get("decay"),
        "ema_num_updates": ema_state.get("num_updates"),
        "optimizer": checkpoint.get("optimizer"),
        "step": None if step is None else int(step),
    }


def _torch_load(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"invalid checkpoint {path!r}: not a regular file")

    # torch.load raises many exception types for damaged or foreign files (RuntimeError for a
    # truncated zip archive, KeyError or EOFError for other bytes), so every failure of this one
    # call is reported as a CheckpointError that keeps the original message.
    try:
        with warnings.catch_warnings():
            # A legacy pickle triggers a UserWarning about its protocol. The file is rejected
            # or read all the same, so the warning would only add a second line to the error.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"rejected checkpoint {path!r}: torch.load(weights_only=True) rejected it "
            f"({_weights_only_detail(error)}). Only tensors and plain containers are allowed, so "
            "the file is either not a PyTorch checkpoint or holds other objects, possibly code "
            "that would run on load"
        ) from error
    except Exception as error:  # noqa: BLE001 - see the comment above
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"invalid checkpoint {path!r}: torch.load failed with "
                              f"{type(error).__name__}: {message!r}; the file may be truncated "
                              "or not a PyTorch checkpoint") from error


def _weights_only_detail(error: pickle.UnpicklingError) -> str:
    """Return the unpickler's own reason, without torch's advice on how to bypass the check."""
    inner = str(error.__context__ or error).strip()
    detail = inner.splitlines()[0] if inner else type(error).__name__
    return detail.split(" Please use")[0]


def _tensor_dict(value, path: str, entry: str) -> dict:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise CheckpointError(f"invalid checkpoint {path!r}: '{entry}' must map parameter names "
                              "to tensors")
    return dict(value)


def strip_data_parallel_prefix(state_dict: Mapping, path: str = "<state dict>") -> dict:
    """Remove the `module.` prefix that nn.DataParallel adds, if every key carries it."""
    prefixed = [k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict]
    if not any(prefixed):
        return dict(state_dict)
    if not all(prefixed):
        unprefixed = [k for k, p in zip(state_dict, prefixed) if not p][:MAX_LISTED_KEYS]
        raise CheckpointError(f"invalid checkpoint {path!r}: only some keys carry the "
                              f"'{DATA_PARALLEL_PREFIX}' prefix; keys without it: {unprefixed}")
    return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}


def trainable_keys(model_state: Mapping) -> list[str]:
    """Return the state-dict keys the reference EMA tracks, in `parameters()` order."""
    return [k for k in model_state if k not in NON_TRAINABLE_KEYS]


def ema_state_dict(model_state: Mapping, shadow_params, path: str = "<state dict>") -> dict:
    """Name the reference EMA's shadow list after `model_state` and fill in the untracked entries.

    Raises:
        CheckpointError: the list's length or a tensor's shape does not match.
    """
    if not isinstance(shadow_params, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) for t in shadow_params):
        raise CheckpointError(f"invalid checkpoint {path!r}: 'ema.shadow_params' must be a list "
                              "of tensors")

    names = trainable_keys(model_state)
    if len(shadow_params) != len(names):
        raise CheckpointError(
            f"invalid checkpoint {path!r}: 'ema.shadow_params' has {len(shadow_params)} tensors "
            f"but the model has {len(names)} trainable parameters (all state-dict entries except "
            f"{', '.join(NON_TRAINABLE_KEYS)})")

    ema = dict(model_state)
    for name, shadow in zip(names, shadow_params):
        if shadow.shape != model_state[name].shape:
            raise CheckpointError(
                f"invalid checkpoint {path!r}: EMA tensor for {name!r} has shape "
                f"{tuple(shadow.shape)} but the model tensor has {tuple(model_state[name].shape)}")
        ema[name] = shadow
    return ema


def check_compatible(net: nn.Module, state_dict: Mapping, path="<state dict>") -> None:
    """Raise one CheckpointError listing every key and shape that keeps `state_dict` from `net`.

    Unlike `load_state_dict`, the message also names the file and shows at most
    MAX_LISTED_KEYS names per category plus a count.
    """
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, network {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]

    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            hidden = len(items) - MAX_LISTED_KEYS
            more = f" and {hidden} more" if hidden > 0 else ""
            problems.append(f"{len(items)} {label} ({'; '.join(items[:MAX_LISTED_KEYS])}{more})")
    if problems:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit the "
                              f"{type(net).__name__} network: " + ", ".join(problems) +
                              ". Check that the configuration matches the one used in training")
