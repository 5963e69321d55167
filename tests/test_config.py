"""Tests of qcsbm.config: typed loading, did-you-mean, ranges, combinations, --set overrides."""

import json
from dataclasses import dataclass, field

import pytest

from qcsbm.config import (
    ConfigValueError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_json,
    save_json,
    to_dict,
    validate_config,
)
from qcsbm.errors import UsageError


def _build(**sections):
    """Build a TrainConfig from the defaults with some keys of some sections replaced."""
    data = to_dict(TrainConfig())
    for section, values in sections.items():
        data[section].update(values)
    return from_dict(TrainConfig, data)


# --- generic machinery --------------------------------------------------------------------

def test_defaults_are_valid():
    validate_config(TrainConfig())
    assert from_dict(TrainConfig, {}) == TrainConfig()


def test_round_trip_through_json(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["model.ch_mult=1,2", "training.n_steps=7",
                                          "optim.grad_clip=none", "data.path=/data/x"])
    path = save_json(cfg, tmp_path / "config.json")
    assert load_json(TrainConfig, path) == cfg
    data = json.loads(path.read_text())
    assert data["model"]["ch_mult"] == [1, 2]
    assert data["optim"]["grad_clip"] is None


def test_documented_cli_keys_exist():
    cfg = apply_overrides(TrainConfig(), ["training.n_steps=3", "data.batch_size=8",
                                          "training.accumulate=2"])
    assert cfg.training.n_steps == 3
    assert cfg.data.batch_size == 8
    assert cfg.training.accumulate == 2


def test_unknown_key_suggests_close_key():
    with pytest.raises(UsageError, match=r"'training\.n_step'; did you mean 'training\.n_steps'"):
        from_dict(TrainConfig, {"training": {"n_step": 3}})


def test_unknown_key_suggests_other_section():
    with pytest.raises(UsageError, match=r"did you mean 'data\.batch_size' or 'eval\.batch_size'"):
        from_dict(TrainConfig, {"training": {"batch_size": 3}})


def test_unknown_section_suggests_section():
    with pytest.raises(UsageError, match=r"'optimizer'; did you mean 'optim'"):
        from_dict(TrainConfig, {"optimizer": {}})


def test_unknown_key_without_match_lists_keys():
    with pytest.raises(UsageError, match=r"'sde\.zzz'; the keys of section 'sde' are: kind, "):
        from_dict(TrainConfig, {"sde": {"zzz": 1}})


@pytest.mark.parametrize("section, key, value, expected", [
    ("training", "n_steps", 3.0, "expected an integer"),
    ("training", "n_steps", "3", "expected an integer"),
    ("training", "n_steps", True, "expected an integer"),
    ("optim", "lr", "0.1", "expected a finite number"),
    ("optim", "lr", False, "expected a finite number"),
    ("data", "random_flip", 1, "expected true or false"),
    ("data", "dataset", 5, "expected a string"),
    ("model", "ch_mult", 2, "expected a list of integers"),
    ("model", "ch_mult", [1, 2.5], "expected a list of integers"),
    ("model", "ch_mult", [1, True], "expected a list of integers"),
    ("sde", "kind", "VE", "expected one of 've', 'vp', 'subvp'"),
    ("optim", "grad_clip", "none", "expected null or a finite number"),
    ("training", "init_from", 3, "expected null or a string"),
])
def test_wrong_type_is_rejected(section, key, value, expected):
    with pytest.raises(UsageError, match=f"invalid {section}.{key} .*{expected}"):
        _build(**{section: {key: value}})


def test_integer_is_accepted_as_number():
    cfg = _build(optim={"lr": 1})
    assert cfg.optim.lr == 1.0
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_number_is_rejected(value):
    with pytest.raises(UsageError, match="optim.lr nan|optim.lr inf"):
        _build(optim={"lr": value})


def test_section_must_be_object():
    with pytest.raises(UsageError, match=r"section .model.: \[1, 2\] \(a list\)"):
        from_dict(TrainConfig, {"model": [1, 2]})


def test_choice_typo_suggests_choice():
    with pytest.raises(UsageError, match="did you mean 'qcsbm'"):
        _build(training={"kind": "qcsmb"})


def test_nested_generic_dataclasses():
    @dataclass
    class Inner:
        width: int = 4
        names: tuple[str, ...] = ("a",)

        def validate(self):
            if self.width > 10:
                raise ConfigValueError("width", self.width, "an integer <= 10")

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        rate: float | None = None

    cfg = from_dict(Outer, {"inner": {"width": 6, "names": ["x", "y"]}, "rate": 0.5})
    assert cfg == Outer(Inner(6, ("x", "y")), 0.5)
    with pytest.raises(ConfigValueError, match=r"invalid inner\.width 11; expected an integer"):
        from_dict(Outer, {"inner": {"width": 11}})


def test_missing_required_key():
    @dataclass
    class NeedsValue:
        size: int

    with pytest.raises(UsageError, match="missing configuration key 'size'; expected an integer"):
        from_dict(NeedsValue, {})


# --- ranges -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value", [
    ("training", "lambda_qc", -0.1),
    ("training", "num_probes", 0),
    ("training", "n_steps", 0),
    ("training", "penalty_fraction", 0.0),
    ("training", "penalty_fraction", 1.5),
    ("training", "accumulate", 0),
    ("training", "snapshot_freq", 0),
    ("training", "keep_checkpoints", 0),
    ("data", "batch_size", 0),
    ("data", "image_size", 0),
    ("data", "num_workers", -1),
    ("sde", "sigma_min", 50.0),
    ("sde", "sigma_min", 0.0),
    ("sde", "t_min", 0.0),
    ("sde", "t_min", 1.0),
    ("sde", "beta_min", 30.0),
    ("model", "nf", 0),
    ("model", "dropout", 1.0),
    ("model", "ch_mult", []),
    ("model", "num_scales", 0),
    ("optim", "lr", 0.0),
    ("optim", "ema_rate", 1.0),
    ("optim", "grad_clip", 0.0),
    ("optim", "warmup", -1),
    ("eval", "num_probes", 0),
    ("eval", "batch_size", 0),
])
def test_range_error_names_key_and_value(section, key, value):
    with pytest.raises(UsageError) as info:
        _build(**{section: {key: value}})
    message = str(info.value)
    assert message.startswith(f"invalid {section}.{key} ")
    assert repr(value) in message or repr(float(value)) in message
    assert "expected" in message
    assert "\n" not in message


def test_boundary_values_are_accepted():
    cfg = _build(training={"penalty_fraction": 1.0, "num_probes": 1},
                 sde={"t_min": 1e-6, "sigma_min": 0.01, "sigma_max": 0.02},
                 optim={"ema_rate": 0.0, "warmup": 0})
    assert cfg.training.penalty_fraction == 1.0
    assert cfg.sde.sigma_max == 0.02


# --- combinations -------------------------------------------------------------------------

def test_usbm_with_lambda_is_rejected():
    with pytest.raises(UsageError, match=r"invalid training\.lambda_qc 0\.001; expected 0 for "
                                         r"kind 'usbm'"):
        _build(training={"kind": "usbm"})
    assert _build(training={"kind": "usbm", "lambda_qc": 0.0}).training.kind == "usbm"


def test_qcsbm_without_lambda_is_rejected():
    with pytest.raises(UsageError, match=r"training\.lambda_qc 0\.0; expected a number > 0"):
        _build(training={"lambda_qc": 0.0})


def test_csbm_nonnegative_forward_is_rejected():
    base = {"kind": "csbm", "lambda_qc": 0.0, "estimator": "nonnegative"}
    no_scale = {"scale_by_sigma": False}
    with pytest.raises(UsageError, match=r"training\.jvp 'forward'.*double-backward"):
        _build(training={**base, "jvp": "forward"}, model=no_scale)
    for jvp in ("auto", "double-backward"):
        assert _build(training={**base, "jvp": jvp}, model=no_scale).training.jvp == jvp


def test_csbm_with_scale_by_sigma_is_rejected():
    with pytest.raises(UsageError, match=r"model\.scale_by_sigma True.*'csbm'"):
        _build(training={"kind": "csbm", "lambda_qc": 0.0})


def test_scale_by_sigma_requires_ve():
    with pytest.raises(UsageError, match=r"model\.scale_by_sigma True.*sde\.kind 'vp'"):
        _build(sde={"kind": "vp", "t_min": 1e-3})
    cfg = _build(sde={"kind": "subvp"}, model={"scale_by_sigma": False})
    assert cfg.sde.kind == "subvp"


def test_accumulate_must_divide_batch():
    with pytest.raises(UsageError, match=r"training\.accumulate 3; expected a divisor of "
                                         r"data\.batch_size \(128\)"):
        _build(training={"accumulate": 3})
    assert _build(training={"accumulate": 4}).training.accumulate == 4


def test_image_size_must_fit_resolutions():
    with pytest.raises(UsageError, match=r"data\.image_size 20; expected a multiple of 8"):
        _build(data={"image_size": 20})


def test_attention_resolution_must_exist():
    with pytest.raises(UsageError, match=r"model\.attn_resolutions \[12\].*\[32, 16, 8, 4\]"):
        _build(model={"attn_resolutions": [12]})


# --- --set overrides ----------------------------------------------------------------------

def test_overrides_coerce_by_field_type():
    cfg = apply_overrides(TrainConfig(), [
        "training.n_steps=3",
        "optim.lr=1e-3",
        "data.random_flip=false",
        "model.ch_mult=[1, 2, 2]",
        "model.attn_resolutions=",
        "training.init_from=runs/a/ckpt.pt",
        "training.kind=usbm",
        "training.lambda_qc=0",
    ])
    assert cfg.training.n_steps == 3
    assert cfg.optim.lr == 1e-3
    assert cfg.data.random_flip is False
    assert cfg.model.ch_mult == (1, 2, 2)
    assert cfg.model.attn_resolutions == ()
    assert cfg.training.init_from == "runs/a/ckpt.pt"
    assert cfg.training.kind == "usbm"
    assert cfg.training.lambda_qc == 0.0


def test_overrides_leave_original_unchanged():
    original = TrainConfig()
    apply_overrides(original, ["training.n_steps=3"])
    assert original == TrainConfig()


def test_later_override_wins():
    cfg = apply_overrides(TrainConfig(), ["training.seed=1", "training.seed=2"])
    assert cfg.training.seed == 2


@pytest.mark.parametrize("text, value", [("true", True), ("Yes", True), ("on", True),
                                         ("1", True), ("False", False), ("no", False),
                                         ("0", False)])
def test_override_boolean_words(text, value):
    cfg = apply_overrides(TrainConfig(), [f"model.fir={text}"])
    assert cfg.model.fir is value


@pytest.mark.parametrize("item, message", [
    ("training.n_steps", r"expected KEY=VALUE"),
    ("=3", r"expected KEY=VALUE"),
    ("training.n_steps=abc", r"training\.n_steps expects an integer"),
    ("training.n_steps=2.5", r"training\.n_steps expects an integer"),
    ("optim.lr=fast", r"optim\.lr expects a finite number"),
    ("model.fir=maybe", r"model\.fir expects true or false"),
    ("model.ch_mult=1,x", r"model\.ch_mult expects a list of integers"),
    ("training.n_step=3", r"did you mean 'training\.n_steps'"),
    ("trainig.n_steps=3", r"did you mean 'training'"),
    ("model=3", r"model is a section; set one of its keys: model\.name"),
    ("training.n_steps.x=3", r"training\.n_steps is a value, not a section"),
    ("sde.kind=ve2", r"invalid sde\.kind 've2'.*one of 've', 'vp', 'subvp'"),
    ("training.n_steps=0", r"invalid training\.n_steps 0; expected an integer >= 1"),
])
def test_bad_override_is_rejected(item, message):
    with pytest.raises(UsageError, match=message):
        apply_overrides(TrainConfig(), [item])


# --- files --------------------------------------------------------------------------------

def test_load_json_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"config file .*nope\.json not found"):
        load_json(TrainConfig, tmp_path / "nope.json")


def test_load_json_invalid_syntax(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"training": {"n_steps": 3,}}')
    with pytest.raises(UsageError, match=r"invalid JSON in config file .*bad\.json at line 1"):
        load_json(TrainConfig, path)


def test_load_json_duplicate_key(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"training": {"n_steps": 3, "n_steps": 4}}')
    with pytest.raises(UsageError, match=r"dup\.json.*duplicate key 'n_steps'"):
        load_json(TrainConfig, path)


def test_load_json_names_file_in_value_errors(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"data": {"batch_size": 0}}))
    with pytest.raises(UsageError, match=r"cfg\.json: invalid data\.batch_size 0"):
        load_json(TrainConfig, path)
