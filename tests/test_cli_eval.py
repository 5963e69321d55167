"""`qcsbm eval`: bits/dim against a Gaussian's closed form, asymmetry of linear fields, sample
quality with a stand-in feature extractor, and the append-only metrics.json."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qcsbm.cli import main
from qcsbm.data.images import ImageDataset, load_images
from qcsbm.errors import UsageError
from qcsbm.evaluation import (asymmetry_of_run, dataset_pixels, nll_of_run, quality_of_run,
                              read_metrics)
from qcsbm.metrics import compute_sample_quality, reference_stats
from qcsbm.sample_shards import SampleSet, save_samples
from qcsbm.sde import VESDE
from test_cli_sample import RUN_STEP, make_run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: these tiny networks gain nothing from intra-op parallelism."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_images(num_images=6, num_levels=4, seed=0):
    """Images of 1 x 2 x 2 pixels (D = 4) with random levels."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, num_levels, (num_images, 1, 2, 2), generator=generator)
    return ImageDataset(levels.to(torch.uint8), num_levels, "tiny")


# --- bits per dimension ---------------------------------------------------------------------


def test_nll_matches_gaussian_closed_form():
    # Data x ~ N(mu, s^2 I) under the VE SDE has the exact score -(x - mu) / (s^2 + sigma^2),
    # and its probability flow scales x - mu by sqrt(v(1) / v(t_min)), v = s^2 + sigma(t)^2.
    sde = VESDE(sigma_min=0.01, sigma_max=3.0)
    mu, s = 0.2, 0.5

    def score(x, t):
        variance = s**2 + sde.sigma(t) ** 2
        return -(x - mu) / variance.reshape(-1, 1, 1, 1)

    run = SimpleNamespace(score_model=score, sde=sde, data={"scale": 2.0, "shift": -1.0})
    dataset = tiny_images()
    result = nll_of_run(run, dataset, num=5, batch_size=2, divergence="exact", seed=3,
                        rtol=1e-6, atol=1e-6)

    # The same dequantization noise: nll_of_run's generator draws it first, in batches.
    generator = torch.Generator().manual_seed(3)
    y = torch.cat([dataset.images([0, 1], dequantize=True, generator=generator),
                   dataset.images([2, 3], dequantize=True, generator=generator),
                   dataset.images([4], dequantize=True, generator=generator)]).double()
    x = 2.0 * y - 1.0
    v0 = s**2 + float(sde.sigma(torch.tensor(sde.t_min))) ** 2
    v1 = s**2 + sde.sigma_max**2
    x1 = mu + (x - mu) * math.sqrt(v1 / v0)
    dims = 4
    logp = (-0.5 * (x1**2).flatten(1).sum(1) / sde.sigma_max**2
            - 0.5 * dims * math.log(2 * math.pi * sde.sigma_max**2)
            + 0.5 * dims * math.log(v1 / v0))
    expected = -(logp + dims * math.log(2.0)) / (dims * math.log(2)) + math.log2(4)

    assert result["bits_per_dim"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert result["offset_bits"] == pytest.approx(math.log2(4) - 1.0)
    assert result["num_samples"] == 5
    assert result["nfe_mean"] > 2


def test_nll_num_too_large():
    run = SimpleNamespace(score_model=None, sde=VESDE(), data={"scale": 1.0, "shift": 0.0})
    with pytest.raises(UsageError, match="has only 6 images"):
        nll_of_run(run, tiny_images(), num=7)


def test_nll_command_appends_entry(tmp_path, capsys):
    # Without weight noise the score is ~0, so the flow keeps x and log p(x) is the prior's.
    run = make_run(tmp_path / "run", weight_noise=0.0)
    code = main(["eval", "nll", "--workdir", str(run), "--num", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err

    entries = read_metrics(run)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["metric"] == "nll"
    assert entry["num_samples"] == 2
    assert entry["step"] == RUN_STEP
    assert entry["weights"] == "ema"
    assert entry["divergence"] == "hutchinson"
    assert entry["dataset"] == "digits:test"
    assert entry["offset_bits"] == pytest.approx(math.log2(17))
    assert entry["nfe_mean"] > 2

    y = load_images("digits", split="test").images(
        [0, 1], dequantize=True, generator=torch.Generator().manual_seed(0)).double()
    sigma_max, dims = 10.0, 64
    logp = (-0.5 * (y**2).flatten(1).sum(1) / sigma_max**2
            - 0.5 * dims * math.log(2 * math.pi * sigma_max**2))
    expected = -logp / (dims * math.log(2)) + math.log2(17)
    assert entry["bits_per_dim"] == pytest.approx(float(expected.mean()), rel=1e-4)


@pytest.mark.parametrize("arguments, message", [
    (["nll", "--num", "0"], "invalid --num 0"),
    (["nll", "--num", "400"], "has only 355 images"),
    (["nll", "--num-probes", "0"], "invalid --num-probes 0"),
    (["asym", "--num-levels", "0"], "invalid --num-levels 0"),
])
def test_bad_input_exit_2(tmp_path, arguments, message, capsys):
    run = make_run(tmp_path / "run")
    before = sorted(path.name for path in run.rglob("*"))
    code = main(["eval", arguments[0], "--workdir", str(run), *arguments[1:]])
    error = capsys.readouterr().err.strip().splitlines()

    assert code == 2
    assert len(error) == 1
    assert message in error[0]
    assert sorted(path.name for path in run.rglob("*")) == before


# --- asymmetry ------------------------------------------------------------------------------


def linear_run(matrix):
    def score(x, t):
        return (x.flatten(1) @ matrix.T).reshape(x.shape)

    return SimpleNamespace(score_model=score, sde=VESDE(sigma_max=3.0),
                           data={"scale": 1.0, "shift": 0.0, "dequantize": False})


def test_asym_zero_for_symmetric_field():
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(4, 4, generator=generator)
    result = asymmetry_of_run(linear_run(half + half.T), tiny_images(), num=6, num_levels=3)
    assert len(result["asym"]) == 3
    assert max(abs(value) for value in result["asym"]) < 1e-5
    assert max(abs(value) for value in result["nasym"]) < 1e-6


def test_asym_matches_linear_field():
    # For s(x) = A x, tr(J J^T) - tr(J J) = 1/2 ||A - A^T||_F^2 at every point and level.
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(4, 4, generator=generator)
    expected = 0.5 * float(((matrix - matrix.T) ** 2).sum())
    expected_nasym = expected / (2 * float((matrix**2).sum()))
    result = asymmetry_of_run(linear_run(matrix), tiny_images(), num=6, num_levels=2,
                              num_probes=2000)
    for asym, nasym in zip(result["asym"], result["nasym"]):
        assert asym == pytest.approx(expected, rel=0.1)
        assert nasym == pytest.approx(expected_nasym, rel=0.1)
    assert result["asym_mean"] == pytest.approx(sum(result["asym"]) / 2, rel=1e-12)
    assert result["nasym_mean"] == pytest.approx(expected_nasym, rel=0.1)


def test_asym_command_keeps_earlier_entries(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    earlier = [{"metric": "earlier", "value": 1}]
    (run / "metrics.json").write_text(json.dumps(earlier))

    code = main(["eval", "asym", "--workdir", str(run), "--num", "4", "--num-levels", "3"])
    assert code == 0, capsys.readouterr().err

    entries = read_metrics(run)
    assert entries[0] == earlier[0]
    assert len(entries) == 2
    assert entries[1]["metric"] == "asym"
    assert len(entries[1]["nasym"]) == 3
    assert all(value >= 0 for value in entries[1]["std"])
    stored = json.loads((run / "eval" / f"asym_step{RUN_STEP}_ema.json").read_text())
    assert stored["asym"] == entries[1]["asym"]
    assert (run / "eval" / f"asym_step{RUN_STEP}_ema.png").stat().st_size > 0


def test_damaged_metrics_file_kept(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "metrics.json").write_text("{not json")
    code = main(["eval", "asym", "--workdir", str(run), "--num", "2", "--num-levels", "2"])
    assert code == 2
    assert "cannot read" in capsys.readouterr().err
    assert (run / "metrics.json").read_text() == "{not json"


# --- sample quality -------------------------------------------------------------------------


class StandInExtractor(nn.Module):
    """A fixed random projection of 4 x 4 average-pooled images (test hook for Inception)."""

    name = "stand-in"

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(48, 8, generator=generator))
        self.register_buffer("classifier", torch.randn(8, 5, generator=generator))

    def forward(self, images):
        pooled = nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        features = torch.tanh(pooled @ self.projection)
        return features, 3.0 * features @ self.classifier


def write_samples(path, images, step=RUN_STEP):
    metadata = {"job": {"sampler": "ode", "checkpoint_step": step, "seed": 0,
                        "settings": {"rtol": 1e-5}, "weights": "ema"},
                "nfe_mean": 42.0, "shard": None, "blocks": []}
    save_samples(path, SampleSet(images, np.arange(len(images)), metadata))
    return path


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("quality") / "run")


def test_quality_entry_from_samples(quality_run, tmp_path):
    test_images = dataset_pixels(load_images("digits", split="test"))[:40]
    samples = write_samples(tmp_path / "samples.npz", test_images)
    entry = quality_of_run(quality_run, samples=samples, ref="train", cache_dir=tmp_path,
                           extractor=StandInExtractor())

    reference = reference_stats(dataset_pixels(load_images("digits", split="train")), "check",
                                tmp_path / "check", StandInExtractor(), progress=False)
    direct = compute_sample_quality(test_images, reference, extractor=StandInExtractor(),
                                    is_splits=10, kid_subset_size=40, progress=False)
    assert entry["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert entry["precision"] == pytest.approx(direct["precision"])
    assert entry["num_samples"] == 40
    assert entry["sampler"] == "ode"
    assert entry["nfe_mean"] == 42.0
    assert entry["step"] == RUN_STEP
    assert entry["extractor"] == "stand-in"
    assert read_metrics(quality_run)[-1]["fid"] == entry["fid"]


def test_quality_real_images_beat_noise(quality_run, tmp_path):
    test_images = dataset_pixels(load_images("digits", split="test"))[:40]
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
    real = quality_of_run(quality_run, samples=write_samples(tmp_path / "real.npz", test_images),
                          cache_dir=tmp_path, extractor=StandInExtractor())
    fake = quality_of_run(quality_run, samples=write_samples(tmp_path / "noise.npz", noise),
                          cache_dir=tmp_path, extractor=StandInExtractor())
    assert real["fid"] < fake["fid"]
    assert real["precision"] > fake["precision"]


def test_quality_missing_inception_weights(quality_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    samples = write_samples(tmp_path / "samples.npz", np.zeros((4, 8, 8, 1), np.uint8))
    before = (quality_run / "metrics.json").read_bytes() if (
        quality_run / "metrics.json").exists() else None

    code = main(["eval", "quality", "--workdir", str(quality_run), "--samples", str(samples)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1
    assert "weights-inception-2015-12-05-6726825d.pth" in error[0]
    assert str(tmp_path / "torch-home") in error[0]
    after = (quality_run / "metrics.json").read_bytes() if (
        quality_run / "metrics.json").exists() else None
    assert after == before
