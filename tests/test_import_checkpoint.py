"""`qcsbm import-checkpoint` on the score_sde_pytorch NCSN++ fixtures: outputs reproduced
through the imported run folder, variants of the file, unsafe and mismatched input, resume."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qcsbm.checkpoints import load_checkpoint
from qcsbm.cli import main
from qcsbm.cli.import_checkpoint import config_from_score_sde, is_score_sde_config
from qcsbm.models import load_run

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ncsnpp"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"score_sde_pytorch NCSN++ fixtures not found at {FIXTURES}")

# Tolerance that FORMAT.md of the fixtures suggests for an independent float32 implementation.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: these small networks gain nothing from intra-op parallelism."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def import_fixture(name, out, *extra, checkpoint=None):
    checkpoint = checkpoint or FIXTURES / name / "checkpoint.pth"
    return main(["import-checkpoint", str(checkpoint), "--out", str(out), "--config",
                 str(FIXTURES / name / "config.json"), *extra])


def save_variant(name, path, **changes):
    """Write a copy of a fixture checkpoint with entries replaced (None deletes an entry)."""
    checkpoint = dict(torch.load(FIXTURES / name / "checkpoint.pth", weights_only=True))
    for key, value in changes.items():
        if value is None:
            checkpoint.pop(key)
        else:
            checkpoint[key] = value
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny and small fixtures imported with their own configurations."""
    folders = {}
    for name in ("tiny", "small"):
        folders[name] = tmp_path_factory.mktemp(name) / "run"
        assert import_fixture(name, folders[name]) == 0
    return folders


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_imported_run_reproduces_outputs(name, imported):
    io = torch.load(FIXTURES / name / "io.pt", weights_only=True)

    for use_ema, expected in ((True, io["out_ema"]), (False, io["out_model"])):
        run = load_run(imported[name], use_ema=use_ema)
        # The network sees sigma(t); the time of each fixture sigma gives the same input.
        t = run.sde.time_of_sigma(io["sigma"].double()).float()
        with torch.no_grad():
            score = run.score_model(io["x"], t)
        torch.testing.assert_close(score, expected, atol=ATOL, rtol=RTOL)
        assert run.step == 2


def test_imported_checkpoint_entries(imported):
    out = imported["tiny"]
    state = load_checkpoint(out / "checkpoints" / "ckpt_2.pt")

    assert state["step"] == 2
    assert state["imported_from"]["step_source"] == "step"
    assert state["ema"]["n_averaged"] == 2
    assert state["config"]["model"]["nf"] == 16
    assert state["data"]["num_levels"] == 256
    # Adam moments cover the trainable parameters only: the Fourier W is frozen.
    trainable = 156
    assert state["optimizer"]["param_groups"][0]["params"] == list(range(trainable))
    assert len(state["optimizer"]["state"]) == trainable
    raw = torch.load(FIXTURES / "tiny" / "checkpoint.pth", weights_only=True)
    torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"],
                               raw["optimizer"]["state"][1]["exp_avg"])
    assert "loader" not in state  # the CIFAR-10 images are not available here
    assert json.loads((out / "config.json").read_text())["model"]["ch_mult"] == [1, 2]


def test_without_step_or_prefix(tmp_path):
    raw = torch.load(FIXTURES / "tiny" / "checkpoint.pth", weights_only=True)
    bare_model = {key.removeprefix("module."): value for key, value in raw["model"].items()}
    variant = save_variant("tiny", tmp_path / "variant.pth", step=None, model=bare_model)

    out = tmp_path / "run"
    assert import_fixture("tiny", out, checkpoint=variant) == 0
    state = load_checkpoint(out / "checkpoints" / "ckpt_2.pt")
    assert state["imported_from"]["step_source"] == "ema.num_updates"
    io = torch.load(FIXTURES / "tiny" / "io.pt", weights_only=True)
    with torch.no_grad():
        output = load_run(out).score_model.net(io["x"], io["sigma"])
    torch.testing.assert_close(output, io["out_ema"], atol=ATOL, rtol=RTOL)


class RunsCodeOnLoad:
    """Unpickling this object creates the file `marker` (a harmless stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_checkpoint_rejected(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as file:
        pickle.dump({"model": RunsCodeOnLoad(marker)}, file, protocol=2)
    variant = save_variant("tiny", tmp_path / "object.pth", step=RunsCodeOnLoad(marker))

    for path in (unsafe, variant):
        out = tmp_path / f"run-{path.stem}"
        assert import_fixture("tiny", out, checkpoint=path) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1
        assert "weights_only" in error[0]
        assert not out.exists()
    assert not marker.exists()


def test_other_architecture_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["import-checkpoint", str(FIXTURES / "tiny" / "checkpoint.pth"), "--out",
                 str(out), "--config", str(FIXTURES / "small" / "config.json")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1
    assert "does not match the model" in error[0]
    assert "shape mismatches" in error[0]
    assert not out.exists()


def test_other_noise_levels_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    assert import_fixture("tiny", out, "--set", "sde.sigma_max=40") == 2
    error = capsys.readouterr().err
    assert "sigmas buffer runs from 50 to 0.01" in error
    assert "from 40 to 0.01" in error
    assert not out.exists()


def test_existing_folder_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert import_fixture("tiny", out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


def test_missing_config_named(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pth"
    checkpoint.write_bytes((FIXTURES / "tiny" / "checkpoint.pth").read_bytes())
    code = main(["import-checkpoint", str(checkpoint), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "missing --config" in capsys.readouterr().err


def test_score_sde_config_translated():
    data = json.loads((FIXTURES / "small" / "config.json").read_text())
    assert is_score_sde_config(data)
    translated = config_from_score_sde(data)
    assert translated["model"]["nf"] == 8
    assert translated["model"]["ch_mult"] == [1, 2, 2, 2]
    assert translated["model"]["centered"] is False
    assert translated["sde"] == {"kind": "ve", "sigma_min": 0.01, "sigma_max": 50}
    assert translated["data"]["image_size"] == 32
    assert translated["optim"]["ema_rate"] == 0.999
    assert translated["training"]["kind"] == "usbm"
    assert not is_score_sde_config({"model": {"nf": 8}, "data": {"dataset": "digits"}})


# --- training from the imported run -----------------------------------------------------------


@pytest.fixture(scope="module")
def trainable_run(tmp_path_factory):
    """The tiny fixture imported with eight random 16 x 16 RGB training images."""
    folder = tmp_path_factory.mktemp("trainable")
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(folder / "images.npz", images=images)
    out = folder / "run"
    assert import_fixture("tiny", out, "--set", "data.dataset=npz",
                          "--set", f"data.path={folder / 'images.npz'}",
                          "--set", "data.batch_size=2", "--set", "data.random_flip=false",
                          "--set", "training.n_steps=2", "--set", "model.dropout=0") == 0
    return out


def test_resume_continues_imported_step(trainable_run):
    imported_state = load_checkpoint(trainable_run / "checkpoints" / "ckpt_2.pt")
    assert imported_state["loader"]["num_images"] == 8

    code = main(["train", "--resume", "--workdir", str(trainable_run), "--set",
                 "training.n_steps=3", "--quiet"])
    assert code == 0
    trained = load_checkpoint(trainable_run / "checkpoints" / "ckpt_3.pt")
    assert trained["step"] == 3
    # Adam continues from the imported moments: its step count goes from 2 to 3.
    assert float(trained["optimizer"]["state"][0]["step"]) == 3.0
    changed = [key for key, value in imported_state["model"].items()
               if not torch.equal(value, trained["model"][key])]
    assert changed


def test_init_from_imported_checkpoint(trainable_run, tmp_path):
    config = tmp_path / "config.json"
    config.write_text((trainable_run / "config.json").read_text())
    finetuned = tmp_path / "finetuned"
    code = main(["train", "--config", str(config), "--workdir", str(finetuned),
                 "--init-from", str(trainable_run / "checkpoints" / "ckpt_2.pt"),
                 "--set", "training.n_steps=1", "--quiet"])
    assert code == 0
    assert load_checkpoint(finetuned / "checkpoints" / "ckpt_1.pt")["step"] == 1
