"""Checkpoints in qcsbm's own format: atomic writes, safe loads, rotation and RNG state.

File format: `torch.save` of the dict {"format": "qcsbm-checkpoint", "version": 1, "state": state},
where `state` holds only tensors, numbers, strings, None and dicts, lists or tuples of them.
Loading always uses `torch.load(..., weights_only=True)`, so a file cannot run code when it is
read. A pickle that refers to any other global raises `CheckpointError`.

Every write goes to a temporary file in the target folder that is flushed, fsynced and then
renamed over the target with `os.replace`, and the folder is fsynced afterwards. A process killed
at any instant therefore leaves either the old file or the new one, never a mix. A killed write
can leave a hidden temporary file `.NAME.<random>.tmp` behind; it never matches `ckpt_<step>.pt`,
and `CheckpointManager.save` removes such leftovers.

Checkpoints from score_sde_pytorch are read by `qcsbm.score_sde_format`, not here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import warnings

import torch
from torch import nn

from qcsbm.errors import CheckpointError, UsageError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qcsbm-checkpoint"
CHECKPOINT_VERSION = 1

POINTER_FORMAT = "qcsbm-latest"
POINTER_NAME = "latest.json"
CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)\.pt")

# Leaf types that `torch.load(..., weights_only=True)` reads back without extra allowlisting.
_PLAIN_LEAVES = (torch.Tensor, bool, int, float, str, type(None), torch.dtype, torch.device,
                 torch.Size)

# How many names an error message lists before it ends with "and N more".
_MAX_LISTED = 5


# --- atomic file writes -------------------------------------------------------------------

def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk where the platform supports it."""
    if os.name != "posix":
        return  # NOTE: os.open cannot open a directory on Windows, so the rename is not flushed.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems (certain network mounts) do not support fsync on a directory.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        logger.debug("fsync of directory %s is not supported: %s", directory, error)
    finally:
        os.close(fd)


def write_atomic(path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: `write(file)` fills a temporary file that replaces `path`.

    The temporary file lives in the same folder (so `os.replace` is an atomic rename), is
    flushed and fsynced before the rename, and the folder is fsynced after it. If `write` or
    the rename raises, the temporary file is removed and `path` keeps its previous content.
    Returns `path` as a `Path`.
    """
    path = Path(path)
    directory = path.parent

    # os.open with mode 0o666 lets the umask set the permissions, as for any new file
    # (tempfile.mkstemp would always create 0o600). The random suffix makes a clash unlikely,
    # and O_EXCL turns one into an error instead of a shared file.
    temp_name = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def write_text_atomic(path, text: str) -> Path:
    """Write UTF-8 text to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


# --- saving and loading -------------------------------------------------------------------

def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the key path of the first value weights_only cannot load."""
    if isinstance(value, _PLAIN_LEAVES):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint state key {where}[{key!r}] has type "
                                f"{type(key).__name__}; expected a string or a number")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"checkpoint state value {where} has type {type(value).__name__}; expected "
                    "tensors, numbers, strings, None, or dicts, lists and tuples of them "
                    "(convert arrays with torch.as_tensor and objects with their state_dict())")


def save_checkpoint(path, state: dict) -> Path:
    """Save `state` to `path` atomically in qcsbm's checkpoint format and return the path.

    Raises TypeError before anything is written when `state` contains a value that
    `torch.load(..., weights_only=True)` could not read back, such as a NumPy array or an
    arbitrary object. The message names the key path of that value.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict; got {type(state).__name__}")
    _check_plain(state, "state")

    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state": dict(state)}
    return write_atomic(path, lambda file: torch.save(payload, file))


def _describe_load_failure(error: Exception) -> str:
    """Turn an exception from torch.load into a short description of the file's problem."""
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if isinstance(error, OSError):
        return f"the file cannot be read ({error.strerror or error})"

    message = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if unsafe:
        return (f"it is unsafe: its pickle refers to {unsafe.group(1)}, which loading would "
                "import and call, and weights_only loading rejects that")
    if "Weights only load failed" in message:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        reason = detail.group(1).strip() if detail else "unsupported content"
        return f"the file is corrupt or not a PyTorch file (weights_only loading: {reason})"
    if "central directory" in message or "zip archive" in message:
        return "the file is truncated or corrupt (its zip archive is incomplete)"
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return f"the file is corrupt or not a PyTorch file ({type(error).__name__}: {first_line})"


def load_checkpoint(path) -> dict:
    """Load the state saved by `save_checkpoint`, on the CPU, with weights_only loading.

    Raises CheckpointError naming the file and the problem when the file is missing,
    truncated, corrupt, unsafe (a pickle that would import and call code), not a qcsbm
    checkpoint, or written by a newer checkpoint version. The file is never modified.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")

    # torch.load raises many exception types for damaged files (EOFError, RuntimeError from
    # the zip reader, UnpicklingError, KeyError on garbage), so every failure is caught here.
    try:
        with warnings.catch_warnings():
            # A legacy pickle triggers a UserWarning about its protocol. The file is rejected
            # or read all the same, so the warning would only add a second line to the error.
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load checkpoint {path}: "
                              f"{_describe_load_failure(error)}") from None

    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"cannot load checkpoint {path}: it is not a qcsbm checkpoint "
                              f"(no format marker {CHECKPOINT_FORMAT!r}); score_sde_pytorch "
                              "checkpoints load with qcsbm.score_sde_format")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"cannot load checkpoint {path}: invalid format version "
                              f"{version!r}; expected an integer >= 1")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"cannot load checkpoint {path}: format version {version} is "
                              f"newer than this qcsbm reads ({CHECKPOINT_VERSION}); upgrade qcsbm")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: its 'state' entry is "
                              f"{type(state).__name__}, not a dict")
    return state


# --- model compatibility ------------------------------------------------------------------

def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f" and {len(names) - _MAX_LISTED} more"
    return shown


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


def check_state_dict_matches(module: nn.Module, state_dict: Mapping, path) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the keys and shapes of `module`.

    One message lists the missing keys, the unexpected keys and the shape mismatches (the
    first few of each), names the file at `path`, and points out a DistributedDataParallel
    (`module.`) or torch.compile (`_orig_mod.`) key prefix when that explains the mismatch.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = []
    for key, value in state_dict.items():
        if key in expected and isinstance(value, torch.Tensor):
            model_shape = tuple(expected[key].shape)
            if tuple(value.shape) != model_shape:
                mismatched.append(f"{key} (checkpoint {tuple(value.shape)}, model {model_shape})")
    if not (missing or unexpected or mismatched):
        return

    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'missing key', 'missing keys')}: "
                        f"{_list_names(missing)}")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key', 'unexpected keys')}: "
                        f"{_list_names(unexpected)}")
    if mismatched:
        problems.append(f"{_count(len(mismatched), 'shape mismatch', 'shape mismatches')}: "
                        f"{_list_names(mismatched)}")
    message = (f"checkpoint {path} does not match the model, so it was probably written for "
               f"another architecture or configuration: {'; '.join(problems)}")

    for prefix, source in (("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile")):
        if unexpected and all(key.startswith(prefix) for key in unexpected):
            stripped = {key[len(prefix):] for key in unexpected}
            if set(missing) <= stripped:
                message += (f"; the checkpoint keys carry the prefix {prefix!r} added by "
                            f"{source}, so remove it before loading")
    raise CheckpointError(message)


# --- random number generator state --------------------------------------------------------

_NDARRAY_TAG = "__ndarray__"


def _to_plain(value):
    """Convert NumPy bit-generator state (arrays, NumPy integers) to weights_only types."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY_TAG: torch.from_numpy(value.astype(np.int64)), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


def _from_plain(value):
    """Invert `_to_plain`."""
    if isinstance(value, dict):
        if _NDARRAY_TAG in value:
            return value[_NDARRAY_TAG].numpy().astype(value["dtype"])
        return {key: _from_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_plain(item) for item in value]
    return value


def capture_rng_state(*, numpy_generator: np.random.Generator | None = None,
                      torch_generator: torch.Generator | None = None) -> dict:
    """Capture every global random stream (and optional generators) as plain checkpoint data.

    The result contains torch's CPU state, the CUDA state of every device when CUDA is
    available, NumPy's legacy global state, Python's `random` state, and the state of
    `numpy_generator` / `torch_generator` when given. Restore it with `restore_rng_state`.
    """
    version, internal, gauss_next = random.getstate()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_legacy": _to_plain(np.random.get_state(legacy=False)),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    if numpy_generator is not None:
        state["numpy_generator"] = _to_plain(numpy_generator.bit_generator.state)
    if torch_generator is not None:
        state["torch_generator"] = torch_generator.get_state()
    return state


def _restore_cuda(saved: list) -> None:
    device_count = torch.cuda.device_count()
    if len(saved) != device_count:
        logger.warning("checkpoint has CUDA random state for %d devices but %d are visible; "
                       "restoring the first %d", len(saved), device_count,
                       min(len(saved), device_count))
    for index, device_state in enumerate(saved[:device_count]):
        torch.cuda.set_rng_state(device_state, device=index)


def restore_rng_state(state: Mapping, *, numpy_generator: np.random.Generator | None = None,
                      torch_generator: torch.Generator | None = None) -> None:
    """Restore the random streams captured by `capture_rng_state`.

    A generator passed here must have been captured too, with the same NumPy bit generator
    type; otherwise CheckpointError. CUDA state is restored for the devices present, with a
    warning when the device count differs or the state has none while CUDA is available.
    """
    for key in ("torch_cpu", "numpy_legacy", "python"):
        if key not in state:
            raise CheckpointError(f"invalid random state: entry {key!r} is missing; "
                                  "expected the output of capture_rng_state")

    torch.set_rng_state(state["torch_cpu"])
    np.random.set_state(_from_plain(state["numpy_legacy"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()),
                     python["gauss_next"]))

    if torch.cuda.is_available():
        if "torch_cuda" in state:
            _restore_cuda(state["torch_cuda"])
        else:
            logger.warning("checkpoint has no CUDA random state (it was written without "
                           "CUDA); CUDA random streams will differ from the original run")

    if numpy_generator is not None:
        saved = state.get("numpy_generator")
        if saved is None:
            raise CheckpointError("invalid random state: a NumPy generator was passed but "
                                  "the state has no 'numpy_generator' entry")
        kind = type(numpy_generator.bit_generator).__name__
        if saved.get("bit_generator") != kind:
            raise CheckpointError(f"invalid random state: the saved NumPy generator is "
                                  f"{saved.get('bit_generator')!r} but the one passed is {kind!r}")
        numpy_generator.bit_generator.state = _from_plain(saved)

    if torch_generator is not None:
        if "torch_generator" not in state:
            raise CheckpointError("invalid random state: a torch generator was passed but "
                                  "the state has no 'torch_generator' entry")
        torch_generator.set_state(state["torch_generator"])


# --- rotation -----------------------------------------------------------------------------

class CheckpointManager:
    """Rotating checkpoints `ckpt_<step>.pt` in one folder with a `latest.json` pointer.

    `save` writes the checkpoint, then the pointer, then deletes all but the `keep` newest
    checkpoints (by step; the one just written is always kept). Each write is atomic, so after
    a kill the pointer names a complete checkpoint. `load_latest` follows the pointer and falls
    back to the newest loadable checkpoint when the pointer or its file is damaged. Only one
    process may write to a folder at a time, because `save` deletes leftover temporary files.
    """

    def __init__(self, directory, keep: int | None = 3):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise UsageError(f"invalid keep {keep!r}; expected an integer >= 1, or None to "
                             "keep every checkpoint")
        self.directory = Path(directory)
        self.keep = keep

    @property
    def pointer_path(self) -> Path:
        return self.directory / POINTER_NAME

    def path_for(self, step: int) -> Path:
        """Return the path of the checkpoint file for `step`."""
        return self.directory / f"ckpt_{step}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """List the (step, path) pairs of the checkpoint files present, oldest step first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = CHECKPOINT_PATTERN.fullmatch(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict) -> Path:
        """Write the checkpoint of `step`, point `latest.json` at it, prune, return its path."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UsageError(f"invalid checkpoint step {step!r}; expected an integer >= 0")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftover_temporaries()

        path = save_checkpoint(self.path_for(step), state)
        pointer = {"format": POINTER_FORMAT, "checkpoint": path.name, "step": step}
        write_text_atomic(self.pointer_path, json.dumps(pointer) + "\n")
        self._prune(newest=path)
        return path

    def _remove_leftover_temporaries(self) -> None:
        for temp in self.directory.glob(".ckpt_*.pt.*.tmp"):
            logger.info("removing %s, left over from an interrupted checkpoint write", temp)
            temp.unlink(missing_ok=True)

    def _prune(self, newest: Path) -> None:
        if self.keep is None:
            return
        others = [path for _, path in self.checkpoints() if path != newest]
        for path in others[:max(0, len(others) - (self.keep - 1))]:
            logger.debug("removing old checkpoint %s", path)
            path.unlink(missing_ok=True)

    def _read_pointer(self) -> Path | None:
        """Return the checkpoint the pointer names, or None (with a warning) if it is unusable."""
        if not self.pointer_path.exists():
            return None
        try:
            pointer = json.loads(self.pointer_path.read_text(encoding="utf-8"))
            name = pointer["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring damaged checkpoint pointer %s (%s: %s)",
                           self.pointer_path, type(error).__name__, error)
            return None

        # The pointer may only name a checkpoint file in this folder, never another path.
        if not isinstance(name, str) or not CHECKPOINT_PATTERN.fullmatch(name):
            logger.warning("ignoring checkpoint pointer %s: it names %r, which is not a "
                           "ckpt_<step>.pt file", self.pointer_path, name)
            return None
        return self.directory / name

    def latest_path(self) -> Path | None:
        """Return the checkpoint the pointer names if that file exists, else the newest one.

        Returns None when there is no checkpoint. The file is not opened, so it may still be
        damaged; `load_latest` checks that.
        """
        pointed = self._read_pointer()
        if pointed is not None and pointed.is_file():
            return pointed
        present = self.checkpoints()
        if not present:
            return None
        if pointed is not None:
            logger.warning("checkpoint pointer names %s, which does not exist; using %s",
                           pointed, present[-1][1])
        return present[-1][1]

    def load_latest(self) -> tuple[Path, dict] | None:
        """Load the newest complete checkpoint and return (path, state), or None if none exists.

        Tries the pointer's checkpoint first, then the others from the highest step down.
        When an older file loads, a warning names each newer file that failed and why.
        Raises CheckpointError listing every file and its problem when checkpoints exist but
        none loads; nothing is logged then, so a command prints the problem once.
        """
        pointed = self._read_pointer()
        candidates = [path for _, path in reversed(self.checkpoints()) if path != pointed]
        if pointed is not None:
            candidates.insert(0, pointed)

        failures = []
        for path in candidates:
            try:
                state = load_checkpoint(path)
            except CheckpointError as error:
                failures.append(str(error))
                continue
            for failure in failures:
                logger.warning("skipping checkpoint: %s", failure)
            if failures:
                logger.warning("loaded %s instead of a newer checkpoint", path)
            return path, state

        if failures:
            raise CheckpointError(f"no loadable checkpoint in {self.directory}: "
                                  + "; ".join(failures))
        return None
