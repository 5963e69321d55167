"""The 2-D study: its pieces, the whole quick run as a subprocess, and bad input."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from qcsbm.errors import UsageError
from qcsbm.metrics.score_field import asymmetry_by_level, noise_level_times, score_error_by_level
from qcsbm.sde import VESDE
from qcsbm.studies import toy2d
from qcsbm.studies.toy2d import PRESETS, Toy2DConfig, summarize

RESULT_KEYS = {"dataset", "model", "seed", "nll", "nfe", "asym", "nasym", "score_error",
               "precision", "recall", "train_seconds"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcsbm", "study", "toy2d", *args],
                          capture_output=True, text=True, timeout=600)


# --- pieces --------------------------------------------------------------------------------


def test_summary_mean_and_std_across_seeds():
    records = [{"dataset": "checkerboard", "model": "usbm", "lambda_qc": 0.0, "seed": seed,
                **{key: float(seed) for key in toy2d.METRIC_KEYS}} for seed in (0, 1, 2)]
    (entry,) = summarize(records)
    assert entry["seeds"] == [0, 1, 2]
    assert entry["nll"]["mean"] == pytest.approx(1.0)
    assert entry["nll"]["std"] == pytest.approx(1.0)


def test_model_runs_expand_lambda_list():
    config = dataclasses.replace(PRESETS["quick"], lambda_qc=(0.0, 0.3, 1.0))
    runs = list(toy2d.model_runs(config))
    assert runs == [("usbm", 0.0), ("csbm", 0.0), ("qcsbm", 0.0), ("qcsbm", 0.3),
                    ("qcsbm", 1.0)]


def test_qcsbm_lambda_is_halved_for_objective():
    # The authors' 2-D DSM term has no factor 1/2, ours has: same ratio of the two terms.
    objective = toy2d.objective_for("qcsbm", 0.1, PRESETS["paper"])
    assert objective.lambda_qc == pytest.approx(0.05)
    assert objective.estimator == "exact"
    assert toy2d.objective_for("usbm", 0.1, PRESETS["paper"]).lambda_qc == 0.0


def test_paper_preset_matches_authors_settings():
    paper = PRESETS["paper"]
    assert (paper.num_steps, paper.batch_size, paper.lambda_qc) == (4000, 5000, (0.1,))
    assert (paper.lr, paper.sigma_min, paper.sigma_max) == (7.5e-4, 0.1, 3.0)


def test_score_error_of_exact_score_is_zero():
    from qcsbm.data.toy2d import get_toy_dataset

    sde = VESDE(0.1, 3.0)
    dataset = get_toy_dataset("8gaussians")
    x0 = dataset.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    times = noise_level_times(sde, 3)

    def exact(x, t):
        return dataset.score(x, sde.sigma(t))

    errors = score_error_by_level(exact, exact, sde, x0, times)
    assert max(errors) == 0.0


def test_asymmetry_levels_of_rotation():
    # x -> A x with A = [[0, 1], [-1, 0]] has Asym 4 and NAsym 1 at every level.
    sde = VESDE(0.1, 3.0)
    matrix = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    levels = asymmetry_by_level(lambda x, t: x @ matrix.T, sde,
                                torch.randn(16, 2, dtype=torch.float64),
                                noise_level_times(sde, 4))
    assert levels.asym == pytest.approx([4.0] * 4)
    assert levels.nasym == pytest.approx([1.0] * 4)
    assert levels.std[0] == pytest.approx(0.1, rel=1e-3)
    assert levels.std[-1] == pytest.approx(3.0)


@pytest.mark.parametrize("changes,option", [
    ({"num_steps": 0}, "--steps"), ({"batch_size": -5}, "--batch-size"),
    ({"lambda_qc": (-0.1,)}, "--lambda-qc"), ({"sigma_min": 3.0}, "--sigma-min"),
    ({"models": ("usbm", "gan")}, "--models"), ({"datasets": ("moons",)}, "--dataset"),
])
def test_config_rejects_bad_values(changes, option):
    config = dataclasses.replace(Toy2DConfig(), **changes)
    with pytest.raises(UsageError, match=option):
        config.validate()


# --- the command ---------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_study_writes_results(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--preset", "quick", "--out", str(out), "--quiet", "--seeds", "0,1")
    assert result.returncode == 0, result.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    records = metrics["results"]
    assert {(r["model"], r["seed"]) for r in records} == {
        (kind, seed) for kind in ("usbm", "csbm", "qcsbm") for seed in (0, 1)}
    for record in records:
        assert RESULT_KEYS <= set(record)
        assert record["dataset"] == "checkerboard"
        assert record["nfe"] > 0
        assert 0.0 <= record["nasym"] <= 1.0
        assert 0.0 <= record["precision"] <= 1.0
    energy = [r for r in records if r["model"] == "csbm"]
    assert max(r["nasym"] for r in energy) < 1e-6

    summary = metrics["summary"]
    assert len(summary) == 3
    for entry in summary:
        assert set(entry["nll"]) == {"mean", "std"}
        assert entry["seeds"] == [0, 1]

    assert (out / "table.md").read_text().count("| checkerboard |") == 3
    assert json.loads((out / "config.json").read_text())["study"] == "toy2d"
    figures = {path.name for path in (out / "figures").iterdir()}
    for name in ("samples", "score_field", "density", "asymmetry"):
        assert f"checkerboard_{name}.png" in figures


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("keep")
    result = run_cli("--preset", "quick", "--out", str(out))
    assert result.returncode == 2
    assert "--overwrite" in result.stderr
    assert (out / "metrics.json").read_text() == "keep"


@pytest.mark.parametrize("args,expected", [
    (["--dataset", "moons"], "moons"),
    (["--models", "usbm,gan"], "gan"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--lambda-qc", "-0.5"], "--lambda-qc"),
    (["--sigma-min", "5", "--sigma-max", "3"], "--sigma-min"),
    (["--preset", "huge"], "huge"),
    (["--seeds", "0,,1"], "empty item"),
    (["--lambda-qc", "1,"], "empty item"),
    (["--dataset", ""], "--dataset"),
    (["--sigma-max", "inf"], "--sigma-max"),
    (["--seeds", "99999999999999999999999"], "--seeds"),
])
def test_bad_options_exit_2(tmp_path, args, expected):
    out = tmp_path / "run"
    result = run_cli("--preset", "quick", "--out", str(out), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert expected in lines[0]
    assert not out.exists()


def test_unwritable_output_exits_2(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("not a folder")
    result = run_cli("--preset", "quick", "--out", str(parent / "run"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
