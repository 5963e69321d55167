"""The one-layer autoencoder score field and the study that trains it with the QC penalty."""

import json
import subprocess
import sys

import pytest
import torch

from qcsbm.cli import main
from qcsbm.jacobian import jacobian, jacobian_asymmetry
from qcsbm.nets.autoencoder import OneLayerAutoencoder, summed_asymmetry, unit_asymmetry
from qcsbm.studies import autoencoder
from qcsbm.studies.autoencoder import AutoencoderStudyConfig


def make_model(seed=0, hidden=2):
    return OneLayerAutoencoder(2, hidden, generator=torch.Generator().manual_seed(seed)).double()


def random_points(n=16, seed=1):
    return 5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)


def swish_derivative(z, beta):
    s = torch.sigmoid(beta * z)
    return s + beta * z * s * (1 - s)


# --- the network -----------------------------------------------------------------------------


def test_jacobian_matches_closed_form():
    model = make_model(hidden=3)
    x = random_points()
    with torch.no_grad():
        d = swish_derivative(x @ model.W + model.b, model.phi.beta)
        expected = torch.einsum("ik,bk,jk->bij", model.R, d, model.W)
        actual = jacobian(model, x)
    torch.testing.assert_close(actual, expected)


def test_init_is_uniform_in_range():
    model = OneLayerAutoencoder(50, 50, init_range=0.5,
                               generator=torch.Generator().manual_seed(0))
    for name in ("W", "b", "R", "c"):
        values = getattr(model, name).detach()
        assert float(values.abs().max()) <= 0.5, name
        assert float(values.abs().max()) > 0.4, name
    torch.testing.assert_close(model.phi.beta.detach(), torch.ones(50))


def test_init_is_reproducible():
    first, second, other = make_model(7), make_model(7), make_model(8)
    torch.testing.assert_close(first.R, second.R)
    assert not torch.equal(first.R, other.R)


def test_tied_columns_make_penalty_zero():
    # r_k = alpha_k w_k makes J = W diag(alpha_k phi'_k) W^T symmetric at every x.
    model = make_model(hidden=3)
    with torch.no_grad():
        model.R.copy_(model.W * torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64))
        x = random_points()
        asym = jacobian_asymmetry(model, x, method="exact")
        scale = jacobian(model, x).pow(2).sum(dim=(1, 2))
        assert float(scale.max()) > 1e-3
        assert float(asym.max()) <= 1e-12 * float(scale.max())
        assert float(unit_asymmetry(model.R, model.W)) < 1e-12
        assert float(summed_asymmetry(model.R, model.W)) < 1e-12


def test_untied_columns_give_positive_penalty():
    model = make_model()
    with torch.no_grad():
        asym = jacobian_asymmetry(model, random_points(), method="exact")
    assert float(asym.mean()) > 1e-4


def test_asymmetry_measures_in_two_dimensions():
    model = make_model(seed=3)
    R, W = model.R.detach(), model.W.detach()
    # Rows r_i, w_i: the reference quantity |r_0 . w_1 - r_1 . w_0|.
    summed = abs(float(R[0] @ W[1] - R[1] @ W[0]))
    # Columns r_k, w_k: the 2-D cross product per hidden unit.
    cross = R[0] * W[1] - R[1] * W[0]
    assert float(summed_asymmetry(R, W)) == pytest.approx(summed)
    assert float(unit_asymmetry(R, W)) == pytest.approx(float(cross.norm()))


def test_summed_asymmetry_is_jacobian_part_at_unit_slope():
    R = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    product = R @ W.T
    expected = (0.5 * (product - product.T).pow(2).sum()).sqrt()
    assert float(summed_asymmetry(R, W)) == pytest.approx(float(expected))


def test_network_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden"):
        OneLayerAutoencoder(2, 0)
    with pytest.raises(ValueError, match="init_range"):
        OneLayerAutoencoder(2, 2, init_range=0.0)


def test_training_lowers_penalty():
    config = AutoencoderStudyConfig(grid_size=6, num_steps=40, learning_rate=1e-2, seeds=(0,))
    points = autoencoder.training_grid(config)
    model, curves, initial = autoencoder.train_one_seed(config, 0, points, quiet=True)
    assert curves["step"][0] == 0
    assert curves["step"][-1] == 40
    assert curves["penalty"][-1] < 0.5 * curves["penalty"][0]
    torch.testing.assert_close(initial["R"], make_model(0).R.detach())


def test_training_grid_covers_square():
    config = AutoencoderStudyConfig(grid_size=5, grid_half_width=10.0)
    grid = autoencoder.training_grid(config)
    assert grid.shape == (25, 2)
    assert float(grid.min()) == -10.0
    assert float(grid.max()) == 10.0


# --- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("autoencoder") / "run"
    command = [sys.executable, "-m", "qcsbm", "study", "autoencoder", "--preset", "quick",
               "--quiet", "--out", str(out), "--steps", "100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return out, result


def test_cli_writes_files(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "metrics.json", "curves.png", "score_field.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "autoencoder"
    assert config["config"]["num_steps"] == 100
    assert config["config"]["seeds"] == [0, 1]


def test_cli_penalty_decreases(quick_run):
    out, result = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"0", "1"}
    for seed, final in metrics["final"].items():
        curve = metrics["curves"][seed]["penalty"]
        assert final["penalty"] < 0.1 * final["initial_penalty"], seed
        assert curve[-1] < curve[0], seed
        assert final["penalty"] == pytest.approx(curve[-1]), seed
        for name in ("asymmetric_part", "unit_asymmetry", "weight_distance"):
            assert final[name] >= 0, (seed, name)


@pytest.mark.parametrize("options, named", [
    (["--hidden", "0"], "--hidden"),
    (["--lr=-1e-3"], "--lr"),
    (["--seeds", "1,1"], "--seeds"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, options, named):
    out = tmp_path / "run"
    code = main(["study", "autoencoder", "--preset", "quick", "--quiet", "--out", str(out),
                 *options])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1
    assert named in stderr
    assert not out.exists()


def test_cli_rejects_malformed_seed_list(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "autoencoder", "--out", str(out), "--seeds", "0,x"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.count("\n") == 1
    assert "--seeds" in stderr
    assert not out.exists()


def test_cli_overwrite_replaces_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    options = ["study", "autoencoder", "--preset", "quick", "--quiet", "--out", str(out),
               "--steps", "2", "--seeds", "0", "--grid-size", "3"]
    assert main(options) == 2
    assert (out / "metrics.json").read_text() == "{}"
    assert main([*options, "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"0"}
    assert (out / "notes.txt").read_text() == "kept"
