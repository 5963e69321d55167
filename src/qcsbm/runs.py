"""Run folders and graceful stopping of long runs.

A run folder contains one training run:

    .qcsbm-run           marker file that identifies the folder as a qcsbm run
    config.json          the validated configuration (qcsbm.config.save_json)
    checkpoints/         ckpt_<step>.pt and latest.json (qcsbm.checkpoints.CheckpointManager)

`prepare_run_dir` applies the rules for starting, resuming and overwriting a run, and
`GracefulStop` turns SIGTERM / SIGINT into a flag that the training loop checks between steps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from qcsbm import __version__
from qcsbm.errors import UsageError

logger = logging.getLogger(__name__)

MARKER_NAME = ".qcsbm-run"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR_NAME = "checkpoints"

# The file names of qcsbm.checkpoints.CheckpointManager, repeated here so that checking a
# folder does not import torch.
_CHECKPOINT_FILE = re.compile(r"ckpt_\d+\.pt")


@dataclass(frozen=True)
class RunDir:
    """A prepared run folder and whether it continues an earlier run."""

    path: Path
    resumed: bool

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR_NAME

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_NAME


def is_run_dir(path) -> bool:
    """Return whether `path` is a folder with the qcsbm run marker file."""
    return (Path(path) / MARKER_NAME).is_file()


def _has_checkpoint(checkpoint_dir: Path) -> bool:
    if not checkpoint_dir.is_dir():
        return False
    return any(_CHECKPOINT_FILE.fullmatch(child.name) and child.is_file()
               for child in checkpoint_dir.iterdir())


def _write_marker(path: Path) -> None:
    marker = {"format": "qcsbm-run", "qcsbm_version": __version__,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (path / MARKER_NAME).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _clear_directory(path: Path) -> None:
    """Delete everything inside `path`; symbolic links are removed, never followed."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _check_writable(path: Path) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {path} is not writable; choose another location or "
                         "fix its permissions")


def prepare_run_dir(path, *, resume: bool = False, overwrite: bool = False) -> RunDir:
    """Create, reuse or clear a run folder according to --resume / --overwrite.

    * A missing folder (or an existing empty one) starts a new run; parents are created.
    * An existing non-empty folder needs `resume` or `overwrite`.
    * `resume` needs an existing run: config.json and at least one checkpoint file.
    * `overwrite` deletes the folder's contents, but only if the folder carries the qcsbm
      run marker, so an arbitrary non-empty folder is never wiped.
    Raises UsageError for every violation, for a path that is not a folder, and for a
    location that cannot be written. Nothing is changed when it raises.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pass only one")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} exists and is not a directory")

    non_empty = path.is_dir() and any(path.iterdir())
    if resume:
        return _resume(path)

    if non_empty and not overwrite:
        raise UsageError(f"run directory {path} exists and is not empty; pass --resume to "
                         "continue that run or --overwrite to delete it and start over")
    if non_empty and not is_run_dir(path):
        raise UsageError(f"cannot overwrite {path}: it is not empty and has no "
                         f"{MARKER_NAME} marker, so it does not look like a qcsbm run; "
                         "choose another directory or empty it yourself")

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create run directory {path}: {error.strerror or error}; "
                         "choose a writable location") from None
    _check_writable(path)
    if non_empty:
        logger.info("deleting the contents of run directory %s (--overwrite)", path)
        _clear_directory(path)
    _write_marker(path)
    return RunDir(path=path, resumed=False)


def _resume(path: Path) -> RunDir:
    run = RunDir(path=path, resumed=True)
    if not path.is_dir():
        raise UsageError(f"cannot resume: run directory {path} does not exist; drop --resume "
                         "to start a new run")
    if not run.config_path.is_file():
        raise UsageError(f"cannot resume: {path} has no {CONFIG_NAME}, so it is not a qcsbm "
                         "run; drop --resume to start a new run in an empty directory")
    if not _has_checkpoint(run.checkpoint_dir):
        raise UsageError(f"cannot resume: run directory {path} has no checkpoint in "
                         f"{CHECKPOINT_DIR_NAME}/; pass --overwrite to start over")
    _check_writable(path)
    return run


class GracefulStop:
    """Context manager that turns SIGTERM / SIGINT into a stop request checked between steps.

    The first signal sets `stop_requested` and logs a warning; the loop should finish its
    current step, save a checkpoint and leave. A second signal restores the previous handlers
    and raises KeyboardInterrupt at once. Leaving the context restores the previous handlers.
    Python delivers signals only to the main thread, so elsewhere the context changes nothing
    and logs a warning.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.stop_requested = False
        self.received: str | None = None  # name of the first signal received
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("GracefulStop outside the main thread has no effect; signals keep "
                           "their current handlers")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self._restore()
        return False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested:
            logger.warning("received %s again; stopping now", name)
            self._restore()
            raise KeyboardInterrupt(f"second stop signal ({name})")
        self.stop_requested = True
        self.received = name
        logger.warning("received %s; stopping after the current step (send it again to stop "
                       "at once)", name)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            # signal.signal returns None for a handler installed outside Python.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
