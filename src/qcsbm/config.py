"""Typed run configuration: dataclass sections, validated when loaded or overridden.

Generic machinery (works for any tree of dataclasses whose fields all have defaults):

* `from_dict(cls, data)` builds a configuration from JSON-like data. An unknown key gets a
  did-you-mean suggestion, a value of the wrong type (integer, number, true/false, string, list
  of integers, one of a set of strings) is rejected, and every section's `validate()` runs.
* `apply_overrides(cfg, ["training.n_steps=3"])` applies `--set KEY=VALUE` options, parsing
  each value according to the field's type, and validates the result.
* `to_dict`, `save_json`, `load_json` write and read the JSON file kept in every run folder.

Every error is a `UsageError` (one line) that names the dotted key, the value and what is
allowed.

`TrainConfig` is the schema of `qcsbm train` for images. Its defaults reproduce the QC-NCSN++
CIFAR-10 run in the code of Chao et al. (ICML 2023), repository chen-hao-chao/qcsbm, files
real_world/configs/qc_ncsn/training/cifar10_ncsnpp_deep_continuous.py and
real_world/configs/default_cifar10_configs.py. That is NCSN++ with nf 128, channel
multipliers (1, 2, 2, 2), 8 residual blocks per resolution, attention at 16x16, a VE SDE with
sigma in [0.01, 50], batch size 128, Adam with learning rate 2e-4 and 5000 warm-up steps,
gradient clipping at 1, EMA rate 0.999, and a balancing factor lambda_qc of 1e-3 with one probe.

Decisions on combinations that `TrainConfig.validate` enforces:

* `training.lambda_qc` must be 0 for kinds "usbm" and "csbm" (an ignored value would be
  misleading; a CSBM's Jacobian is symmetric, so its penalty is zero) and > 0 for "qcsbm".
* Kind "csbm" computes its score with autograd (minus the gradient of the energy), so
  Jacobian-vector products for the "nonnegative" estimator must use double backward:
  `training.jvp` "forward" is rejected there, and "auto" picks double backward.
* `model.scale_by_sigma` divides the network output by the network's conditioning value. That
  value is sigma(t) only for the VE SDE (VP and sub-VP condition on 999 t), so scale_by_sigma
  requires `sde.kind` "ve". Kind "csbm" requires scale_by_sigma false, because the energy
  forms of `qcsbm.scores.EnergyScore` divide by the marginal std themselves.
* `data.batch_size` is the batch of one optimizer step. With `training.accumulate` = k it is
  split into k micro-batches, so it must be divisible by k, and changing k leaves the
  optimization unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from qcsbm.errors import UsageError

ConfigT = TypeVar("ConfigT")


class ConfigValueError(UsageError):
    """A configuration value outside its allowed range or in a forbidden combination.

    `key` is relative to the section whose `validate()` raised it. `from_dict` adds the
    section's prefix, so the message the user sees names the full dotted key.
    """

    def __init__(self, key: str, value, expected: str):
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {key} {value!r}; expected {expected}")


# --- type handling ------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _optional_inner(tp):
    """Return X for `X | None` / `Optional[X]`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


_PLURAL_NAMES = {bool: "true/false values", int: "integers", float: "finite numbers",
                 str: "strings"}


def _describe_type(tp) -> str:
    """Return the phrase that error messages use for the values a type accepts."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"null or {_describe_type(inner)}"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of " + _PLURAL_NAMES[typing.get_args(tp)[0]]
    if dataclasses.is_dataclass(tp):
        return "a section (a JSON object)"
    return {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}[tp]


class _WrongType(Exception):
    """Raised by `_coerce` for a value that its annotation does not accept."""


def _coerce(value, tp):
    """Return `value` (as read from JSON) converted to the annotation `tp`, or raise _WrongType."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner)

    if typing.get_origin(tp) is Literal:
        if not any(type(value) is type(choice) and value == choice
                   for choice in typing.get_args(tp)):
            raise _WrongType
        return value

    if typing.get_origin(tp) is tuple:
        element_type, ellipsis = typing.get_args(tp)
        assert ellipsis is Ellipsis, "only variable-length tuples tuple[T, ...] are supported"
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        return tuple(_coerce(item, element_type) for item in value)

    if tp is bool:
        if not isinstance(value, bool):
            raise _WrongType
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType
        if not math.isfinite(value):
            raise _WrongType
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _WrongType
        return value
    raise TypeError(f"unsupported configuration field type {tp!r}")


def _convert(value, tp, key: str, root):
    """Check `value` against the annotation `tp` and convert it, or raise UsageError."""
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key, root)
    try:
        return _coerce(value, tp)
    except _WrongType:
        pass

    message = f"invalid {key} {value!r} ({_json_type(value)}); expected {_describe_type(tp)}"
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in typing.get_args(tp)], n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    raise UsageError(message)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


# --- did-you-mean -------------------------------------------------------------------------

def _leaf_keys(cls, prefix: str = "") -> list[str]:
    """List every dotted key of a configuration class, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        key = _join(prefix, item.name)
        keys.append(key)
        if dataclasses.is_dataclass(hints[item.name]):
            keys.extend(_leaf_keys(hints[item.name], key))
    return keys


def _unknown_key_error(key: str, name: str, section_cls, section_prefix: str,
                       root) -> UsageError:
    """Build the error for an unknown key, with the closest known key as a suggestion."""
    names = [item.name for item in dataclasses.fields(section_cls)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        suggestion = f"; did you mean {_join(section_prefix, close[0])!r}?"
    else:
        # The same name in another section ("training.batch_size" -> "data.batch_size"), or
        # a close dotted key anywhere.
        all_keys = _leaf_keys(root)
        same_name = [known for known in all_keys if known.rsplit(".", 1)[-1] == name]
        close = same_name or difflib.get_close_matches(key, all_keys, n=1, cutoff=0.75)
        if close:
            suggestion = "; did you mean " + " or ".join(repr(k) for k in close[:3]) + "?"
        else:
            where = f"section {section_prefix!r}" if section_prefix else "the configuration"
            suggestion = f"; the keys of {where} are: " + ", ".join(names)
    return UsageError(f"unknown configuration key {key!r}{suggestion}")


# --- building and validating --------------------------------------------------------------

def _run_validate(obj, prefix: str) -> None:
    """Call obj.validate() if it exists, naming keys relative to the root in its errors."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigValueError as error:
        raise ConfigValueError(_join(prefix, error.key), error.value, error.expected) from None


def _from_dict(cls, data, prefix: str, root):
    if not isinstance(data, Mapping):
        where = f"section {prefix!r}" if prefix else "a configuration"
        raise UsageError(f"invalid {where}: {data!r} ({_json_type(data)}); expected an "
                         "object of keys and values")

    fields_by_name = {item.name: item for item in dataclasses.fields(cls)}
    for name in data:
        if name not in fields_by_name:
            raise _unknown_key_error(_join(prefix, str(name)), str(name), cls, prefix, root)

    hints = typing.get_type_hints(cls)
    values = {}
    for name, item in fields_by_name.items():
        key = _join(prefix, name)
        if name in data:
            values[name] = _convert(data[name], hints[name], key, root)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise UsageError(f"missing configuration key {key!r}; expected "
                             f"{_describe_type(hints[name])}")
    obj = cls(**values)
    _run_validate(obj, prefix)
    return obj


def from_dict(cls: type[ConfigT], data: Mapping) -> ConfigT:
    """Build the configuration `cls` from JSON-like data, check its types and validate it.

    Keys missing from `data` take the field's default. Raises UsageError for an unknown key
    (with a did-you-mean), a value of the wrong type, or a value that a section's `validate()`
    rejects. The message names the dotted key.
    """
    return _from_dict(cls, data, "", cls)


def validate_config(cfg) -> None:
    """Validate a configuration built in code: every section first, then the whole."""
    _validate_tree(cfg, "")


def _validate_tree(obj, prefix: str) -> None:
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, _join(prefix, item.name))
    _run_validate(obj, prefix)


def to_dict(cfg) -> dict:
    """Convert a configuration to plain JSON data (tuples become lists)."""
    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return plain(dataclasses.asdict(cfg))


# --- --set KEY=VALUE ----------------------------------------------------------------------

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _parse_text(text: str, tp, key: str, item: str):
    """Parse the text of a --set value into JSON-like data of the field's type."""
    def invalid():
        return UsageError(f"invalid --set {item!r}: {key} expects {_describe_type(tp)}")

    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in ("none", "null"):
            return None
        try:
            return _parse_text(text, inner, key, item)
        except UsageError:
            raise invalid() from None
    if typing.get_origin(tp) is Literal:
        return text.strip()  # from_dict checks the choice and names the allowed values
    if typing.get_origin(tp) is tuple:
        inner_text = text.strip()
        if inner_text[:1] in ("(", "[") and inner_text[-1:] in (")", "]"):
            inner_text = inner_text[1:-1]
        parts = [part.strip() for part in inner_text.split(",")]
        if parts and parts[-1] == "":
            parts.pop()  # allow a trailing comma, as in "16,"
        try:
            return [_parse_text(part, typing.get_args(tp)[0], key, item) for part in parts]
        except UsageError:
            raise invalid() from None
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise invalid()
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise invalid() from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise invalid() from None
    if tp is str:
        return text
    raise TypeError(f"unsupported configuration field type {tp!r} for {key}")


def _field_type(root_cls, parts: list[str], item: str):
    """Return the annotation of the dotted field `parts`, or raise for an unknown key."""
    cls, prefix = root_cls, ""
    for name in parts:
        key = _join(prefix, name)
        if not dataclasses.is_dataclass(cls):
            raise UsageError(f"invalid --set {item!r}: {prefix} is a value, not a section")
        if name not in {known.name for known in dataclasses.fields(cls)}:
            raise _unknown_key_error(key, name, cls, prefix, root_cls)
        cls, prefix = typing.get_type_hints(cls)[name], key
    if dataclasses.is_dataclass(cls):
        keys = ", ".join(_join(prefix, f.name) for f in dataclasses.fields(cls))
        raise UsageError(f"invalid --set {item!r}: {prefix} is a section; set one of its keys: "
                         f"{keys}")
    return cls


def apply_overrides(cfg: ConfigT, overrides: Iterable[str]) -> ConfigT:
    """Return a copy of `cfg` with `KEY=VALUE` overrides applied, validated as a whole.

    KEY is a dotted key such as "training.n_steps". VALUE is parsed by the field's type.
    Integers and numbers are written as in Python, and booleans as true/false, yes/no, on/off
    or 1/0. A list of integers is written "1,2,2,2" with optional brackets, or "" when empty.
    "none" or "null" sets a field that may be null. Later overrides of the same key win.
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid --set {item!r}; expected KEY=VALUE, for example "
                             "training.n_steps=1000")
        parts = key.split(".")
        tp = _field_type(type(cfg), parts, item)

        section = data
        for name in parts[:-1]:
            section = section[name]
        section[parts[-1]] = _parse_text(text, tp, key, item)
    return from_dict(type(cfg), data)


# --- JSON files ---------------------------------------------------------------------------

def save_json(cfg, path) -> Path:
    """Write the configuration to `path` as indented JSON, atomically."""
    # Imported here so that reading and validating a configuration does not import torch.
    from qcsbm.checkpoints import write_text_atomic

    return write_text_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def _reject_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"duplicate key {key!r}")
        result[key] = value
    return result


def load_json(cls: type[ConfigT], path) -> ConfigT:
    """Read a JSON configuration file and build `cls` from it with `from_dict`.

    Raises UsageError naming the file for a missing or unreadable file, invalid JSON (with
    line and column), a duplicate key, or any error `from_dict` reports.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read config file {path}: {error}") from None

    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        return from_dict(cls, data)
    except json.JSONDecodeError as error:
        raise UsageError(f"invalid JSON in config file {path} at line {error.lineno}, column "
                         f"{error.colno}: {error.msg}") from None
    except UsageError as error:
        raise UsageError(f"in config file {path}: {error}") from None


# --- the image-training schema ------------------------------------------------------------

def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigValueError(key, value, expected)


def _require_positive_ints(key: str, values: tuple[int, ...], allow_empty: bool) -> None:
    _require(allow_empty or len(values) > 0, key, list(values), "a non-empty list")
    for value in values:
        _require(value >= 1, key, list(values), "integers >= 1")


# The largest float32; Adam casts lr to the parameters' dtype.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class ModelConfig:
    """The NCSN++ network (field names follow score_sde_pytorch's model config)."""

    name: Literal["ncsnpp"] = "ncsnpp"
    nf: int = 128  # channels at the first resolution
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channel multiplier per resolution
    num_res_blocks: int = 8  # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions (in pixels) with self-attention
    dropout: float = 0.1
    fourier_scale: float = 16.0  # std of the Gaussian Fourier features' frequencies
    fir: bool = True  # FIR up/down-sampling
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True  # scale skip sums by 1/sqrt(2)
    resblock_type: Literal["biggan", "ddpm"] = "biggan"
    progressive: Literal["none", "output_skip", "residual"] = "none"
    progressive_input: Literal["none", "input_skip", "residual"] = "residual"
    progressive_combine: Literal["sum", "cat"] = "sum"
    init_scale: float = 0.0  # initial weight scale of the output layers (0: zero output)
    scale_by_sigma: bool = True  # divide the output by sigma (VE only)
    centered: bool = False  # False: data in [0, 1] is mapped to [-1, 1] inside the network
    conditional: bool = True  # condition on the noise level
    embedding_type: Literal["fourier", "positional"] = "fourier"
    num_scales: int = 1000  # noise levels of a discretised SDE (samplers' default step count)

    def validate(self) -> None:
        _require(self.nf >= 1, "nf", self.nf, "an integer >= 1")
        _require_positive_ints("ch_mult", self.ch_mult, allow_empty=False)
        _require(self.num_res_blocks >= 1, "num_res_blocks", self.num_res_blocks,
                 "an integer >= 1")
        _require_positive_ints("attn_resolutions", self.attn_resolutions, allow_empty=True)
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")
        _require(self.fourier_scale > 0, "fourier_scale", self.fourier_scale, "a number > 0")
        _require_positive_ints("fir_kernel", self.fir_kernel, allow_empty=False)
        _require(self.init_scale >= 0, "init_scale", self.init_scale, "a number >= 0")
        _require(self.num_scales >= 1, "num_scales", self.num_scales, "an integer >= 1")


@dataclass
class DataConfig:
    """The training images and how batches are drawn."""

    dataset: str = "cifar10"  # a name known to qcsbm.data (which checks it when loading)
    path: str | None = None  # data folder or file; None for the source's default location
    split: Literal["train", "test"] = "train"
    image_size: int = 32  # height and width in pixels
    num_channels: int = 3
    batch_size: int = 128  # images per optimizer step (split over training.accumulate)
    random_flip: bool = True  # random horizontal flips
    dequantize: bool = False  # uniform dequantization (k + u) / L of the integer levels
    num_workers: int = 0  # data loader worker processes

    def validate(self) -> None:
        _require(self.dataset.strip() != "", "dataset", self.dataset, "a data set name")
        _require(self.image_size >= 1, "image_size", self.image_size, "an integer >= 1")
        _require(self.num_channels >= 1, "num_channels", self.num_channels, "an integer >= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


@dataclass
class SDEConfig:
    """The forward SDE (qcsbm.sde); sigma_* apply to kind "ve", beta_* to "vp" and "subvp"."""

    kind: Literal["ve", "vp", "subvp"] = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-5  # smallest time used in the loss, sampling and the likelihood

    def validate(self) -> None:
        _require(self.sigma_min > 0, "sigma_min", self.sigma_min, "a number > 0")
        _require(self.sigma_min < self.sigma_max, "sigma_min", self.sigma_min,
                 f"a number < sigma_max ({self.sigma_max})")
        _require(self.beta_min > 0, "beta_min", self.beta_min, "a number > 0")
        _require(self.beta_min <= self.beta_max, "beta_min", self.beta_min,
                 f"a number <= beta_max ({self.beta_max})")
        _require(0.0 < self.t_min < 1.0, "t_min", self.t_min, "0 < t_min < 1")


@dataclass
class TrainingConfig:
    """The objective and the loop: model kind, QC penalty, steps, checkpoints."""

    kind: Literal["usbm", "csbm", "qcsbm"] = "qcsbm"
    n_steps: int = 1_300_000  # optimizer steps of the whole run
    lambda_qc: float = 1e-3  # balancing factor of the QC penalty; used by kind "qcsbm" only
    num_probes: int = 1  # random probes per sample for the "hutchinson"/"nonnegative" penalty
    estimator: Literal["exact", "hutchinson", "nonnegative"] = "hutchinson"
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    jvp: Literal["auto", "forward", "double-backward"] = "auto"  # J v for "nonnegative"
    penalty_fraction: float = 1.0  # fraction of each batch that the penalty is computed on
    weighting: Literal["sigma2", "likelihood"] = "sigma2"  # DSM weighting over time
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    seed: int = 42
    log_freq: int = 50  # steps between log lines
    snapshot_freq: int = 10_000  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept in the run folder
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops or skips the step
    mixed_precision: Literal["no", "bf16"] = "no"
    init_from: str | None = None  # checkpoint whose weights start the run
    energy_form: Literal["norm", "residual"] = "norm"  # EnergyScore form for kind "csbm"

    def validate(self) -> None:
        _require(self.n_steps >= 1, "n_steps", self.n_steps, "an integer >= 1")
        _require(self.lambda_qc >= 0, "lambda_qc", self.lambda_qc, "a number >= 0")
        _require(self.num_probes >= 1, "num_probes", self.num_probes, "an integer >= 1")
        _require(0.0 < self.penalty_fraction <= 1.0, "penalty_fraction", self.penalty_fraction,
                 "0 < penalty_fraction <= 1")
        _require(self.accumulate >= 1, "accumulate", self.accumulate, "an integer >= 1")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(self.log_freq >= 1, "log_freq", self.log_freq, "an integer >= 1")
        _require(self.snapshot_freq >= 1, "snapshot_freq", self.snapshot_freq,
                 "an integer >= 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints,
                 "an integer >= 1")
        _require(self.init_from is None or self.init_from.strip() != "", "init_from",
                 self.init_from, "null or a checkpoint path")

        if self.kind == "qcsbm":
            _require(self.lambda_qc > 0, "lambda_qc", self.lambda_qc,
                     "a number > 0 for kind 'qcsbm' (kind 'usbm' trains without the penalty)")
        else:
            _require(self.lambda_qc == 0, "lambda_qc", self.lambda_qc,
                     f"0 for kind {self.kind!r}, which does not use the QC penalty; "
                     "choose kind 'qcsbm' to train with it")
        if self.kind == "csbm" and self.estimator == "nonnegative":
            _require(self.jvp != "forward", "jvp", self.jvp,
                     "'auto' or 'double-backward' for kind 'csbm', whose score calls autograd "
                     "and so cannot run in forward mode")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate warm-up, gradient clipping and the EMA of the weights."""

    optimizer: Literal["adam"] = "adam"
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # Adam's denominator offset
    weight_decay: float = 0.0
    warmup: int = 5000  # steps of linear learning-rate warm-up; 0 for none
    grad_clip: float | None = 1.0  # max global gradient norm; None for no clipping
    ema_rate: float = 0.999  # decay of the exponential moving average of the weights

    def validate(self) -> None:
        _require(0 < self.lr <= FLOAT32_MAX, "lr", self.lr, "a number > 0 and <= 3.4e38")
        _require(0.0 <= self.beta1 < 1.0, "beta1", self.beta1, "0 <= beta1 < 1")
        _require(0.0 <= self.beta2 < 1.0, "beta2", self.beta2, "0 <= beta2 < 1")
        _require(self.eps > 0, "eps", self.eps, "a number > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
                 "null (no clipping) or a number > 0")
        _require(0.0 <= self.ema_rate < 1.0, "ema_rate", self.ema_rate, "0 <= ema_rate < 1")


@dataclass
class EvalConfig:
    """Evaluation during and after training: sample quality, likelihood, asymmetry metrics."""

    batch_size: int = 256
    num_samples: int = 50_000  # samples for FID / IS / PRDC
    num_probes: int = 1  # probes per sample for Hutchinson estimates (Asym, NAsym, divergence)
    estimator: Literal["exact", "hutchinson"] = "hutchinson"
    nearest_k: int = 3  # k of the k-nearest-neighbour radii of precision/recall/density/coverage
    rtol: float = 1e-5  # probability-flow ODE tolerances
    atol: float = 1e-5

    def validate(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        _require(self.num_probes >= 1, "num_probes", self.num_probes, "an integer >= 1")
        _require(self.nearest_k >= 1, "nearest_k", self.nearest_k, "an integer >= 1")
        _require(self.rtol > 0, "rtol", self.rtol, "a number > 0")
        _require(self.atol > 0, "atol", self.atol, "a number > 0")


@dataclass
class TrainConfig:
    """Everything `qcsbm train` needs for an image run; written to config.json in the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Check combinations across sections (each section validates itself first)."""
        if self.model.scale_by_sigma:
            _require(self.sde.kind == "ve", "model.scale_by_sigma", True,
                     f"false for sde.kind {self.sde.kind!r}, whose network conditioning is "
                     "999 t, not sigma")
            _require(self.training.kind != "csbm", "model.scale_by_sigma", True,
                     "false for training.kind 'csbm', whose energy divides by the std itself")

        _require(self.data.batch_size % self.training.accumulate == 0, "training.accumulate",
                 self.training.accumulate,
                 f"a divisor of data.batch_size ({self.data.batch_size})")

        # Resolutions of NCSN++: the image is halved once between consecutive ch_mult entries.
        num_downsamplings = len(self.model.ch_mult) - 1
        _require(self.data.image_size % (2 ** num_downsamplings) == 0, "data.image_size",
                 self.data.image_size,
                 f"a multiple of {2 ** num_downsamplings} for {len(self.model.ch_mult)} "
                 "resolutions (model.ch_mult)")
        resolutions = [self.data.image_size // 2 ** level
                       for level in range(len(self.model.ch_mult))]
        for resolution in self.model.attn_resolutions:
            _require(resolution in resolutions, "model.attn_resolutions",
                     list(self.model.attn_resolutions),
                     f"resolutions among {resolutions} (data.image_size halved per "
                     "model.ch_mult entry)")
