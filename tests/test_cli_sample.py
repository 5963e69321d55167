"""`qcsbm sample`: sample files, quantization to the data's levels, seeds and bad input.

`make_run` builds a small run folder in the format `qcsbm train` writes (its other tests
import it), so the tests need no training.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qcsbm.checkpoints import CheckpointManager
from qcsbm.cli import main
from qcsbm.config import apply_overrides, save_json, to_dict
from qcsbm.data.images import load_images
from qcsbm.evaluation import levels_to_pixels, samples_to_images
from qcsbm.models import build_score_model, data_metadata
from qcsbm.presets import preset_config
from qcsbm.runs import prepare_run_dir
from qcsbm.sample_shards import load_samples

RUN_STEP = 5

# A one-resolution NCSN++ on the 8x8 digits: small enough for sampling tests on a CPU.
SMALL_MODEL = ["model.nf=8", "model.ch_mult=1", "model.attn_resolutions=",
               "model.num_res_blocks=1"]


def make_run(path, *, kind="usbm", overrides=(), seed=0, weight_noise=0.05):
    """Write a run folder with a randomly initialized model whose EMA weights differ.

    Noise of std `weight_noise` is added to every weight, twice for the EMA weights.
    Without it the output layer's initial weights (model.init_scale 0) make the score ~0.
    """
    cfg = apply_overrides(preset_config(f"digits-{kind}"), [*SMALL_MODEL, *overrides])
    torch.manual_seed(seed)
    score_model, _ = build_score_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    model_state, ema_state = {}, {}
    for key, value in score_model.net.state_dict().items():
        if value.is_floating_point() and key != "sigmas":
            value = value + weight_noise * torch.randn(value.shape, generator=generator,
                                                       dtype=value.dtype)
            ema_state[key] = value + weight_noise * torch.randn(value.shape, generator=generator,
                                                                dtype=value.dtype)
        else:
            ema_state[key] = value
        model_state[key] = value

    run = prepare_run_dir(path)
    save_json(cfg, run.config_path)
    state = {"step": RUN_STEP, "config": to_dict(cfg), "model": model_state,
             "ema": {"state_dict": ema_state, "n_averaged": RUN_STEP},
             "data": data_metadata(load_images("digits", split="train"), cfg)}
    CheckpointManager(run.checkpoint_dir).save(RUN_STEP, state)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: these tiny networks gain nothing from intra-op parallelism."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def folder_snapshot(path):
    return sorted((str(item.relative_to(path)), item.stat().st_mtime_ns)
                  for item in path.rglob("*"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "digits")


def sample(run_dir, out, *extra):
    return main(["sample", "--workdir", str(run_dir), "--out", str(out), "--quiet", *extra])


ODE_FAST = ["--sampler", "ode", "--rtol", "1e-3", "--atol", "1e-3"]
PC_FAST = ["--sampler", "pc", "--steps", "3"]


# --- sample files -----------------------------------------------------------------------------


def test_ode_sample_file(run_dir, tmp_path):
    out = tmp_path / "ode.npz"
    assert sample(run_dir, out, *ODE_FAST, "--num", "3", "--batch-size", "2") == 0
    samples = load_samples(out)

    assert samples.images.shape == (3, 8, 8, 1)
    assert samples.images.dtype == np.uint8
    allowed = set(levels_to_pixels(np.arange(17), 17).tolist())
    assert set(np.unique(samples.images).tolist()) <= allowed
    assert samples.indices.tolist() == [0, 1, 2]

    job = samples.metadata["job"]
    assert job["checkpoint_step"] == RUN_STEP
    assert job["sampler"] == "ode"
    assert job["settings"]["rtol"] == 1e-3
    assert job["seed"] == 0
    assert job["weights"] == "ema"
    assert samples.metadata["shard"] is None
    assert [block["num_samples"] for block in samples.metadata["blocks"]] == [2, 1]
    assert all(block["nfe"] > 1 for block in samples.metadata["blocks"])
    assert samples.metadata["nfe_mean"] > 1

    with Image.open(out.with_suffix(".png")) as grid:
        assert grid.width >= 2 * 8


def test_pc_seed_reproducible(run_dir, tmp_path):
    first, again, other = (tmp_path / f"{name}.npz" for name in ("first", "again", "other"))
    assert sample(run_dir, first, *PC_FAST, "--num", "2", "--seed", "7") == 0
    assert sample(run_dir, again, *PC_FAST, "--num", "2", "--seed", "7") == 0
    assert sample(run_dir, other, *PC_FAST, "--num", "2", "--seed", "8") == 0

    first_samples = load_samples(first)
    assert np.array_equal(first_samples.images, load_samples(again).images)
    assert not np.array_equal(first_samples.images, load_samples(other).images)
    # Three predictor steps, each after one Langevin corrector step.
    assert first_samples.metadata["nfe_mean"] == 6
    assert first_samples.metadata["job"]["settings"]["snr"] == 0.16


def test_model_weights_differ_from_ema(run_dir, tmp_path):
    ema, model = tmp_path / "ema.npz", tmp_path / "model.npz"
    assert sample(run_dir, ema, *PC_FAST, "--num", "2", "--corrector", "none") == 0
    assert sample(run_dir, model, *PC_FAST, "--num", "2", "--corrector", "none",
                  "--use-model-weights") == 0
    ema_samples, model_samples = load_samples(ema), load_samples(model)
    assert model_samples.metadata["job"]["weights"] == "model"
    assert ema_samples.metadata["nfe_mean"] == 3
    assert not np.array_equal(ema_samples.images, model_samples.images)


def test_default_out_in_run_folder(tmp_path):
    run = make_run(tmp_path / "run")
    assert main(["sample", "--workdir", str(run), "--quiet", *PC_FAST, "--num", "1"]) == 0
    assert (run / "samples" / f"pc_step{RUN_STEP}_seed0_n1.npz").is_file()
    assert (run / "samples" / f"pc_step{RUN_STEP}_seed0_n1.png").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["--sampler", "ode", "--num", "0"], "invalid --num 0"),
    (["--num", "2"], "missing --sampler"),
    (["--sampler", "pc", "--num", "2", "--steps", "0"], "invalid --steps 0"),
    (["--sampler", "ode", "--num", "2", "--rtol", "-1"], "invalid rtol -1.0"),
    (["--sampler", "ode", "--num", "2", "--shard", "2/2"], "invalid --shard '2/2'"),
    (["--sampler", "ode", "--num", "2", "--out", "samples.txt"], "ending in .npz"),
    (["--sampler", "ode", "--num", "2", "--checkpoint-step", "9"], "no checkpoint of step 9"),
    (["merge"], "missing DIRECTORY"),
])
def test_bad_input_exit_2(run_dir, arguments, message, capsys):
    before = folder_snapshot(run_dir)
    code = main(["sample", "--workdir", str(run_dir), "--quiet", *arguments])
    error = capsys.readouterr().err.strip().splitlines()

    assert code == 2
    assert len(error) == 1
    assert message in error[0]
    assert folder_snapshot(run_dir) == before


def test_not_a_run_folder(tmp_path, capsys):
    code = main(["sample", "--workdir", str(tmp_path), "--sampler", "ode", "--num", "1"])
    assert code == 2
    assert "not a qcsbm run" in capsys.readouterr().err


# --- quantization -----------------------------------------------------------------------------


def test_levels_to_pixels_mapping():
    assert levels_to_pixels(np.array([0, 1, 8, 16]), 17).tolist() == [0, 16, 128, 255]
    assert levels_to_pixels(np.arange(256), 256).tolist() == list(range(256))


@pytest.mark.parametrize("num_levels", [17, 256])
def test_samples_to_images_dequantized(num_levels):
    levels = torch.arange(num_levels, dtype=torch.float64).reshape(1, 1, 1, num_levels)
    y = (levels + 0.7) / num_levels  # inside the dequantization cell of each level
    data = {"scale": 2.0, "shift": -1.0, "num_levels": num_levels, "dequantize": True}
    images = samples_to_images(2.0 * y - 1.0, data)

    assert images.shape == (1, 1, num_levels, 1)
    expected = np.rint(np.arange(num_levels) * 255 / (num_levels - 1)).astype(np.uint8)
    assert images[0, 0, :, 0].tolist() == expected.tolist()


def test_samples_to_images_rounded_and_clipped():
    data = {"scale": 1.0, "shift": 0.0, "num_levels": 17, "dequantize": False}
    x = torch.tensor([-0.3, 0.0, 0.49 / 16, 0.51 / 16, 1.0, 1.7, float("nan")])
    images = samples_to_images(x.reshape(1, 1, 1, -1), data)
    assert images[0, 0, :, 0].tolist() == [0, 0, 0, 16, 255, 255, 0]


# --- the contract with `qcsbm train` ----------------------------------------------------------


@pytest.mark.slow
def test_sample_after_train(tmp_path):
    run, out = tmp_path / "run", tmp_path / "samples.npz"
    command = [sys.executable, "-m", "qcsbm"]
    subprocess.run([*command, "train", "--config", "digits-qcsbm", "--workdir", str(run),
                    "--set", "training.n_steps=3", "--set", "data.batch_size=8", "--quiet"],
                   check=True, capture_output=True)
    subprocess.run([*command, "sample", "--workdir", str(run), "--sampler", "ode", "--num", "4",
                    "--out", str(out), "--quiet"], check=True, capture_output=True)

    samples = load_samples(out)
    assert samples.images.shape == (4, 8, 8, 1)
    assert samples.images.dtype == np.uint8
    assert json.loads(json.dumps(samples.metadata))["job"]["checkpoint_step"] == 3


def test_existing_out_needs_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "mine.npz"
    out.write_bytes(b"user data")
    assert sample(run_dir, out, *PC_FAST, "--num", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"user data"

    assert sample(run_dir, out, *PC_FAST, "--num", "1", "--overwrite") == 0
    assert load_samples(out).images.shape[0] == 1


@pytest.mark.parametrize("sampler", [PC_FAST, ODE_FAST], ids=["pc", "ode"])
def test_nan_weights_sample_exits_3(tmp_path, capsys, sampler):
    run = make_run(tmp_path / "nan-run", weight_noise=float("nan"))
    before = folder_snapshot(run)
    out = tmp_path / "nan.npz"

    assert sample(run, out, *sampler, "--num", "2") == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "NaN" in err
    assert not out.exists()
    assert not out.with_suffix(".png").exists()
    assert folder_snapshot(run) == before


def test_nan_weights_eval_asym_exits_3(tmp_path, capsys):
    run = make_run(tmp_path / "nan-run", weight_noise=float("nan"))
    before = folder_snapshot(run)

    code = main(["eval", "asym", "--workdir", str(run), "--num", "2", "--num-levels", "2",
                 "--quiet"])
    assert code == 3
    assert "NaN or inf" in capsys.readouterr().err
    assert folder_snapshot(run) == before
