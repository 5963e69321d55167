"""Checkpoints crafted to run code when unpickled are rejected by every command that loads one.

Each crafted file contains an object whose `__reduce__` makes plain unpickling call `exec`,
which would create a marker file. A control test shows that `torch.load(weights_only=False)`
does create it, so the payload is live. Every command must exit with code 2, name the file and
the rejected global, create no marker and leave the file as it was.
"""

import hashlib
import shutil

import numpy as np
import pytest
import torch

from qcsbm.checkpoints import load_checkpoint
from qcsbm.cli import main
from qcsbm.config import apply_overrides
from qcsbm.errors import UsageError
from qcsbm.presets import preset_config
from qcsbm.sample_shards import load_samples
from qcsbm.trainer import train

TINY = ["model.nf=8", "model.ch_mult=1", "model.attn_resolutions=", "data.batch_size=8",
        "training.log_freq=1"]
TINY_ARGS = [arg for override in TINY for arg in ("--set", override)]


class CodeOnLoad:
    """Unpickles by calling exec on code that creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_payload(path, payload, legacy=False):
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def qcsbm_payload(marker):
    """A qcsbm-format checkpoint whose model weights are the code-running object."""
    state = {"step": 2, "model": CodeOnLoad(marker), "ema": {"n_averaged": 1}}
    return {"format": "qcsbm-checkpoint", "version": 1, "state": state}


def score_sde_payload(marker):
    """A score_sde_pytorch-format checkpoint whose model weights are the code-running object."""
    return {"model": CodeOnLoad(marker), "ema": {}, "optimizer": {}, "step": 10}


PAYLOADS = {
    "qcsbm": (qcsbm_payload, False),
    "qcsbm-legacy-pickle": (qcsbm_payload, True),
    "score_sde": (score_sde_payload, False),
    "score_sde-legacy-pickle": (score_sde_payload, True),
}


def file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with one checkpoint, ckpt_2.pt."""
    workdir = tmp_path_factory.mktemp("unsafe") / "run"
    cfg = apply_overrides(preset_config("digits-usbm"),
                          TINY + ["training.n_steps=2", "training.snapshot_freq=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, workdir, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return workdir


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_runs_code_when_unpickled(tmp_path, name):
    make, legacy = PAYLOADS[name]
    marker = tmp_path / "marker"
    path = write_payload(tmp_path / "evil.pth", make(marker), legacy)

    torch.load(path, weights_only=False)

    assert marker.exists()


def plant_in_run(trained_run, tmp_path, payload):
    """Copy the run and replace its only checkpoint with `payload`."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    return write_payload(workdir / "checkpoints" / "ckpt_2.pt", payload), workdir


COMMANDS = {
    "train --resume": lambda workdir, evil, out: ["train", "--resume", "--workdir",
                                                  str(workdir), "--quiet"],
    "sample": lambda workdir, evil, out: ["sample", "--workdir", str(workdir), "--num", "2",
                                          "--sampler", "pc", "--steps", "2", "--quiet",
                                          "--device", "cpu"],
    "sample --checkpoint-step": lambda workdir, evil, out: [
        "sample", "--workdir", str(workdir), "--num", "2", "--sampler", "pc", "--steps", "2",
        "--quiet", "--checkpoint-step", "2", "--device", "cpu"],
    "eval nll": lambda workdir, evil, out: ["eval", "nll", "--workdir", str(workdir),
                                            "--num", "2", "--quiet"],
    "eval asym": lambda workdir, evil, out: ["eval", "asym", "--workdir", str(workdir),
                                             "--num", "2", "--num-levels", "2", "--quiet"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_run_folder_with_planted_checkpoint(trained_run, tmp_path, capsys, command):
    marker = tmp_path / "marker"
    evil, workdir = plant_in_run(trained_run, tmp_path, qcsbm_payload(marker))
    before = file_hash(evil)

    code = main(COMMANDS[command](workdir, evil, tmp_path / "out"))

    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert not marker.exists()
    assert "exec" in stderr  # the message names the global that loading would call
    assert str(evil) in stderr
    assert file_hash(evil) == before


def test_resume_skips_planted_checkpoint(tmp_path, caplog):
    # With an older complete checkpoint, resume rejects the planted newest one and uses it.
    workdir = tmp_path / "run"
    cfg = apply_overrides(preset_config("digits-usbm"),
                          TINY + ["training.n_steps=2", "training.snapshot_freq=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, workdir, progress=False, device="cpu")
        marker = tmp_path / "marker"
        evil = write_payload(workdir / "checkpoints" / "ckpt_2.pt", qcsbm_payload(marker))
        with caplog.at_level("WARNING"):
            code = main(["train", "--resume", "--workdir", str(workdir), "--quiet"])
    finally:
        torch.set_num_threads(threads)

    assert code == 0
    assert not marker.exists()
    warnings = [record.getMessage() for record in caplog.records
                if record.levelname == "WARNING"]
    assert any(str(evil) in message and "exec" in message for message in warnings), warnings
    assert any("loaded" in message and "ckpt_1.pt" in message for message in warnings), warnings
    assert load_checkpoint(evil)["step"] == 2


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_train_init_from_rejects(tmp_path, capsys, name):
    make, legacy = PAYLOADS[name]
    marker = tmp_path / "marker"
    evil = write_payload(tmp_path / "evil.pth", make(marker), legacy)
    before = file_hash(evil)

    code = main(["train", "--config", "digits-usbm", "--workdir", str(tmp_path / "run"),
                 "--init-from", str(evil), "--quiet", *TINY_ARGS])

    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert not marker.exists()
    assert "exec" in stderr  # the message names the global that loading would call
    assert str(evil) in stderr
    assert not (tmp_path / "run").exists()
    assert file_hash(evil) == before


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_import_checkpoint_rejects(tmp_path, capsys, name):
    make, legacy = PAYLOADS[name]
    marker = tmp_path / "marker"
    evil = write_payload(tmp_path / "evil.pth", make(marker), legacy)
    before = file_hash(evil)

    code = main(["import-checkpoint", str(evil), "--out", str(tmp_path / "run"),
                 "--config", "digits-usbm", *TINY_ARGS])

    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert not marker.exists()
    assert "exec" in stderr  # the message names the global that loading would call
    assert str(evil) in stderr
    assert not (tmp_path / "run").exists()
    assert file_hash(evil) == before


def test_object_arrays_in_npz_rejected(tmp_path, capsys):
    # An .npz with an object array unpickles it on load unless allow_pickle is False.
    marker = tmp_path / "marker"
    images = np.empty(1, dtype=object)
    images[0] = CodeOnLoad(marker)
    data = tmp_path / "images.npz"
    np.savez(data, images=images)

    code = main(["train", "--config", "digits-usbm", "--workdir", str(tmp_path / "run"),
                 "--quiet", *TINY_ARGS, "--set", "data.dataset=npz",
                 "--set", f"data.path={data}"])

    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert not marker.exists()
    assert str(data) in stderr
    assert not (tmp_path / "run").exists()


def test_object_arrays_in_samples_rejected(tmp_path):
    # `qcsbm eval quality` reads sample files with load_samples. It needs the Inception
    # weights before it opens them, and tests cannot download those, so this calls it directly.
    marker = tmp_path / "marker"
    samples = np.empty(1, dtype=object)
    samples[0] = CodeOnLoad(marker)
    path = tmp_path / "samples.npz"
    np.savez(path, images=samples, indices=np.zeros(1, dtype=np.int64),
             metadata=np.array("{}"))

    with pytest.raises(UsageError, match="invalid sample file"):
        load_samples(path)

    assert not marker.exists()
