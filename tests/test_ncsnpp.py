"""NCSN++ against score_sde_pytorch fixtures, the deep model's key list and closed forms."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qcsbm.errors import UsageError
from qcsbm.jacobian import nasym
from qcsbm.nets import NCSNpp, NCSNppConfig
from qcsbm.nets.ncsnpp_layers import downsample_fir, group_norm_groups, upsample_fir
from qcsbm.score_sde_format import load_score_sde_checkpoint
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ncsnpp"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"score_sde_pytorch NCSN++ fixtures not found at {FIXTURES}")

DEEP_KEYS = "cifar10_ncsnpp_deep_continuous_nrb8_keys.txt"


def fixture_config(name):
    return json.loads((FIXTURES / name / "config.json").read_text())


def read_key_list(path):
    """Return [(name, shape, dtype)] from a `name<TAB>shape tuple<TAB>dtype` file."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), dtype))
    return rows


def deep_score_sde_config():
    """The QCSBM paper's U-NCSN++ config: the tiny fixture's options at full size."""
    cfg = fixture_config("tiny")
    cfg["model"].update(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=8, attn_resolutions=[16])
    cfg["data"]["image_size"] = 32
    return cfg


@pytest.fixture(scope="module")
def deep_meta_net():
    with torch.device("meta"):
        return NCSNpp.from_score_sde_config(deep_score_sde_config())


def tiny_net_with_fixture_weights(**overrides):
    """The tiny fixture network with its trained weights, optionally with changed options."""
    config = NCSNppConfig(**{**NCSNpp.from_score_sde_config(fixture_config("tiny")).config
                             .to_dict(), **overrides})
    net = NCSNpp.from_config(config)
    net.load_state_dict(load_score_sde_checkpoint(FIXTURES / "tiny" / "checkpoint.pth")["model"])
    return net.eval()


# ----------------------------------------------------------------------------------------------
# Compatibility with score_sde_pytorch


@needs_fixtures
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_fixture_outputs_reproduced(name):
    checkpoint = load_score_sde_checkpoint(FIXTURES / name / "checkpoint.pth")
    io = torch.load(FIXTURES / name / "io.pt", weights_only=True)
    net = NCSNpp.from_score_sde_config(fixture_config(name)).eval()

    for weights, expected in (("model", io["out_model"]), ("ema", io["out_ema"])):
        net.load_state_dict(checkpoint[weights], strict=True)
        with torch.no_grad():
            out = net(io["x"], io["sigma"])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4, msg=weights)


@needs_fixtures
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_state_dict_matches_fixture_keys(name):
    expected = [(k.removeprefix("module."), shape, dtype)
                for k, shape, dtype in read_key_list(FIXTURES / name / "keys.txt")]
    net = NCSNpp.from_score_sde_config(fixture_config(name))
    actual = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
              for k, v in net.state_dict().items()]
    assert actual == expected


@needs_fixtures
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_order_matches_reference(name):
    rows = [line.split("\t") for line in
            (FIXTURES / name / "param_order.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    expected = [(key.removeprefix("module."), requires_grad == "True")
                for _, _, key, requires_grad in rows]
    net = NCSNpp.from_score_sde_config(fixture_config(name))
    assert [(k, p.requires_grad) for k, p in net.named_parameters()] == expected


@needs_fixtures
def test_prefixed_keys_fail_strict_load():
    raw = torch.load(FIXTURES / "tiny" / "checkpoint.pth", weights_only=True)
    net = NCSNpp.from_score_sde_config(fixture_config("tiny"))
    with pytest.raises(RuntimeError, match="module.all_modules"):
        net.load_state_dict(raw["model"], strict=True)

    wrapped = nn.DataParallel(net)
    wrapped.load_state_dict(raw["model"], strict=True)


@needs_fixtures
def test_deep_model_matches_reference_keys(deep_meta_net):
    expected = [(k.removeprefix("module."), shape)
                for k, shape, _ in read_key_list(FIXTURES / "reference_keys" / DEEP_KEYS)]
    actual = [(k, tuple(v.shape)) for k, v in deep_meta_net.state_dict().items()]
    assert len(actual) == 964
    assert actual == expected


def test_deep_model_parameter_count(deep_meta_net):
    params = list(deep_meta_net.parameters())
    assert sum(p.numel() for p in params) == 107_587_075
    assert sum(p.numel() for p in params if p.requires_grad) == 107_586_947
    assert len(deep_meta_net.all_modules) == 95


def test_plain_constructor_defaults_are_deep_model(deep_meta_net):
    with torch.device("meta"):
        net = NCSNpp(image_size=32)
    assert net.config == deep_meta_net.config


def test_group_norm_groups_capped_at_32(deep_meta_net):
    assert [group_norm_groups(c) for c in (8, 16, 64, 124, 128, 132, 512)] == [2, 4, 16, 31, 32,
                                                                                 32, 32]
    norms = [m for m in deep_meta_net.modules() if isinstance(m, nn.GroupNorm)]
    assert {m.num_channels for m in norms} == {128, 256, 384, 512}
    assert all(m.num_groups == 32 for m in norms)
    assert all(m.eps == 1e-6 for m in norms)


# ----------------------------------------------------------------------------------------------
# Forward conventions


def small_random_net(**overrides):
    torch.manual_seed(0)
    net = NCSNpp(image_size=8, num_channels=2, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), init_scale=1.0, **overrides)
    return net.eval()


def test_output_divided_by_sigma():
    scaled = small_random_net()
    unscaled = small_random_net(scale_by_sigma=False)
    x, sigma = torch.rand(3, 2, 8, 8), torch.tensor([0.1, 1.0, 20.0])
    with torch.no_grad():
        expected = unscaled(x, sigma) / sigma[:, None, None, None]
        torch.testing.assert_close(scaled(x, sigma), expected)


def test_centered_input_skips_mapping():
    uncentered = small_random_net()
    centered = small_random_net(centered=True)
    x, sigma = torch.rand(2, 2, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(centered(2 * x - 1, sigma), uncentered(x, sigma))


def test_scalar_sigma_broadcast():
    net = small_random_net()
    x = torch.rand(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(0.7)), net(x, torch.full((2,), 0.7)))


def test_dropout_only_in_train_mode():
    net = small_random_net(dropout=0.5)
    x, sigma = torch.rand(2, 2, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), net(x, sigma))
        net.train()
        assert not torch.allclose(net(x, sigma), net(x, sigma))


def test_fourier_frequencies_frozen():
    net = small_random_net()
    x, sigma = torch.rand(2, 2, 8, 8), torch.tensor([0.3, 3.0])
    net(x, sigma).square().sum().backward()
    assert net.all_modules[0].W.grad is None
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# FIR resampling


def test_fir_upsample_of_impulse_is_kernel():
    impulse = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    impulse[0, 0, 2, 3] = 1.0
    up = upsample_fir(impulse, (1, 3, 3, 1))

    # The impulse at (2, 3) lands at (4, 6), and its 4x4 footprint starts one pixel before.
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    expected = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    expected[0, 0, 3:7, 5:9] = torch.outer(k, k) / 16
    assert up.shape == (1, 1, 12, 12)
    torch.testing.assert_close(up, expected)


def test_fir_upsample_is_scaled_adjoint_of_downsample():
    # <up(x), y> = factor^2 <x, down(y)> because both use the same filter and padding.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator)
    kernel = (1, 3, 3, 1)
    lhs = (upsample_fir(x, kernel) * y).sum()
    rhs = 4 * (x * downsample_fir(y, kernel)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_fir_resampling_keeps_constants_inside():
    constant = torch.full((1, 2, 8, 8), 0.25, dtype=torch.float64)
    down = downsample_fir(constant, (1, 3, 3, 1))
    up = upsample_fir(constant, (1, 3, 3, 1))
    assert down.shape == (1, 2, 4, 4)
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 0.25))
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.25))


# ----------------------------------------------------------------------------------------------
# Energy variant


@needs_fixtures
def test_energy_variant_is_conservative():
    sde = VESDE(0.01, 50.0)
    net = tiny_net_with_fixture_weights(scale_by_sigma=False).double()
    energy_score = EnergyScore(net, sde, form="norm")
    unconstrained_score = UnconstrainedScore(net, sde)

    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    results = {}
    for name, score in (("energy", energy_score), ("unconstrained", unconstrained_score)):
        results[name] = nasym(lambda y, score=score: score(y, t), x, method="hutchinson",
                              num_probes=2, generator=torch.Generator().manual_seed(1),
                              create_graph=False)

    assert results["energy"].abs().max() < 1e-10
    assert results["unconstrained"].min() > 1e-3


# ----------------------------------------------------------------------------------------------
# Construction and input checks


def test_compact_sizes():
    digits = NCSNpp.compact(8, 1)
    rgb = NCSNpp.compact(32, 3)
    assert digits.config.ch_mult == (1, 2)
    assert rgb.config.ch_mult == (1, 2, 2, 2)
    assert sum(p.numel() for p in digits.parameters()) == 753_185
    assert sum(p.numel() for p in rgb.parameters()) == 1_831_651

    for net, shape in ((digits, (2, 1, 8, 8)), (rgb, (2, 3, 32, 32))):
        with torch.no_grad():
            out = net(torch.rand(shape), torch.tensor([0.5, 5.0]))
        assert out.shape == shape
        assert torch.isfinite(out).all()


def test_config_round_trip():
    config = NCSNpp.compact(8, 1).config
    assert NCSNppConfig(**config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


@pytest.mark.parametrize("options, match", [
    (dict(image_size=12, ch_mult=(1, 2, 2, 2)), "image_size 12"),
    (dict(image_size=16, attn_resolutions=(5,)), r"attn_resolutions \(5,\)"),
    (dict(image_size=16, nf=2), "nf 2"),
    (dict(image_size=16, ch_mult=()), r"ch_mult \(\)"),
    (dict(image_size=16, dropout=1.0), "dropout 1.0"),
    (dict(image_size=16, sigma_max=0.001), "sigma_max 0.001"),
    (dict(image_size=16, channels=3), r"arguments \['channels'\]"),
])
def test_invalid_options_rejected(options, match):
    with pytest.raises(UsageError, match=match):
        NCSNpp(**{"ch_mult": (1, 2), "attn_resolutions": (8,), **options})


@pytest.mark.parametrize("name, value", [
    ("progressive", "output_skip"), ("embedding_type", "positional"), ("fir", False),
    ("resblock_type", "ddpm"), ("conditional", False),
])
def test_unsupported_score_sde_options_rejected(name, value):
    cfg = {"model": {"nf": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                     name: value},
           "data": {"image_size": 16, "num_channels": 3}}
    with pytest.raises(UsageError, match=f"model.{name} {value!r}"):
        NCSNpp.from_score_sde_config(cfg)


def test_score_sde_config_missing_entry_rejected():
    cfg = {"model": {"nf": 16, "ch_mult": [1, 2], "attn_resolutions": [8]},
           "data": {"image_size": 16, "num_channels": 3}}
    with pytest.raises(UsageError, match="num_res_blocks"):
        NCSNpp.from_score_sde_config(cfg)


def test_wrong_input_shape_rejected():
    net = small_random_net()
    with pytest.raises(UsageError, match=r"x of shape \(1, 3, 8, 8\)"):
        net(torch.rand(1, 3, 8, 8), torch.ones(1))
    with pytest.raises(UsageError, match="divisible by 2"):
        net(torch.rand(1, 2, 7, 7), torch.ones(1))
    with pytest.raises(UsageError, match=r"sigma of shape \(2, 1\)"):
        net(torch.rand(2, 2, 8, 8), torch.ones(2, 1))
