"""Plumbing shared by every study: options, the output folder, JSON files, figures, progress.

A study module provides `add_arguments(parser)` and `run(args) -> int`. Its run

1. turns the parsed options into a config dataclass (`config_from_args`), which raises
   `UsageError` for bad values before anything is written;
2. claims the output folder (`prepare_output_dir`), which refuses to reuse a folder that
   already has files unless `--overwrite` is given;
3. writes `config.json` (`write_config`), computes, then writes `metrics.json`
   (`write_metrics`) and its figures (`new_figure`, `save_figure`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

from qcsbm.errors import UsageError, check_choice

logger = logging.getLogger(__name__)

PRESETS = ("quick", "default")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


# --- options -------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, default_out: str,
                         presets: tuple[str, ...] = PRESETS) -> None:
    """Add --preset, --out, --quiet and --overwrite, which every study accepts.

    `presets` lists the study's preset names. It must contain "quick" (finishes in seconds,
    for tests and smoke runs) and "default" (reproduces the study).
    """
    missing = [name for name in PRESETS if name not in presets]
    assert not missing, f"a study must define the presets {PRESETS}; missing {missing}"
    parser.add_argument("--preset", default="default", choices=presets,
                        help="size of the run: 'quick' is a smoke test of about a minute "
                        "(for tests), 'default' reproduces the study (default: default); "
                        f"choices: {', '.join(presets)}")
    parser.add_argument("--out", default=default_out,
                        help=f"output folder for config.json, metrics.json and figures "
                        f"(default: {default_out})")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an output folder that already contains files, "
                        "replacing files of the same name")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")


def config_from_args(presets: dict[str, Any], args: argparse.Namespace,
                     overrides: dict[str, str]) -> Any:
    """Return the preset's config with every option in `overrides` that the user set.

    Args:
        presets: preset name -> config dataclass instance.
        args: the parsed options; `args.preset` picks the preset.
        overrides: option attribute on `args` -> config field name. An option whose value
            is None (not given) keeps the preset's value.
    """
    check_choice("--preset", args.preset, tuple(presets))
    changes = {}
    for option, field in overrides.items():
        value = getattr(args, option, None)
        if value is not None:
            changes[field] = value
    config = dataclasses.replace(presets[args.preset], **changes)
    config.validate()
    return config


def _parse_list(text: str, convert, noun: str, example: str) -> tuple:
    """Parse a comma-separated list with `convert`; reject empty items and bad values."""
    parts = text.split(",")
    if any(not part.strip() for part in parts):
        raise argparse.ArgumentTypeError(
            f"invalid {noun} list {text!r}; it has an empty item, expected for example {example}")
    try:
        return tuple(convert(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid {noun} list {text!r}; expected comma-separated {noun}s such as {example}"
        ) from None


def parse_int_list(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of integers such as "0,1,2" (argparse type)."""
    return _parse_list(text, int, "integer", "0,1,2")


def parse_float_list(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of numbers such as "0,0.5e-3" (argparse type)."""
    return _parse_list(text, float, "number", "0,1e-3")


# --- output folder and files ---------------------------------------------------------------


def prepare_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Create the output folder, or raise UsageError if it already contains files.

    With `overwrite`, an existing folder is reused: files of the same name are replaced and
    other files in it are left alone.
    """
    if not str(out).strip():
        raise UsageError("invalid --out ''; expected a folder path")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"invalid --out {str(path)!r}: it is a file; expected a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(path)!r} already contains files; "
                         f"pass --overwrite to write into it or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"invalid --out {str(path)!r}: cannot create the folder "
                         f"({error.strerror}); choose a writable location") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"invalid --out {str(path)!r}: the folder is not writable; "
                         "choose a writable location")
    return path


def _to_json(value: Any) -> Any:
    """Convert tuples, dataclasses and non-finite floats into what strict JSON allows."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, with NaN and infinity as null."""
    path = Path(path)
    path.write_text(json.dumps(_to_json(data), indent=2, allow_nan=False) + "\n")
    return path


def write_config(out: Path, study: str, config: Any) -> Path:
    """Write config.json: the study name and every field of its config dataclass."""
    return write_json(out / CONFIG_FILE, {"study": study, "config": config})


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json."""
    path = write_json(out / METRICS_FILE, metrics)
    logger.info("wrote %s", path)
    return path


# --- figures and progress ------------------------------------------------------------------


def new_figure(ncols: int = 1, *, panel_size: float = 4.0):
    """Return (figure, axes) on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel_size * ncols, panel_size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def save_figure(figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a figure from `new_figure` as PNG."""
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    logger.info("wrote %s", path)
    return path


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "",
             quiet: bool = False):
    """Wrap `iterable` in one tqdm bar on stderr, hidden when `quiet`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False,
                dynamic_ncols=True)
