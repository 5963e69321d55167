"""`qcsbm train` on the command line: the contract run, SIGTERM, bad input, presets."""

import os
import signal
import subprocess
import sys
import time

import pytest

from qcsbm.cli import main
from qcsbm.models import load_run
from qcsbm.presets import PRESETS

# A small NCSN++ so that the subprocess runs stay short.
TINY = ["--set", "model.nf=8", "--set", "model.ch_mult=1", "--set", "model.attn_resolutions="]


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "qcsbm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_contract_command_leaves_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", "digits-qcsbm", "--workdir", str(workdir),
                     "--set", "training.n_steps=3", "--set", "data.batch_size=8")

    assert result.returncode == 0, result.stderr
    assert (workdir / "checkpoints" / "ckpt_3.pt").is_file()
    assert (workdir / "config.json").is_file()
    assert "finished 3 steps" in result.stderr
    assert load_run(workdir).step == 3


def test_sigterm_leaves_loadable_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "qcsbm", "train", "--config", "digits-usbm", "--workdir",
         str(workdir), "--quiet", *TINY, "--set", "training.n_steps=100000",
         "--set", "training.log_freq=1", "--set", "data.batch_size=8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    # Wait until training runs (metrics.jsonl gets its first line), then stop it.
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "training did not start within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 75, stderr
    assert "stopped by SIGTERM" in stderr
    assert "--resume" in stderr
    loaded = load_run(workdir)
    assert 1 <= loaded.step < 100000


@pytest.mark.parametrize("args, message", [
    (["--set", "training.n_steps=abc"], "training.n_steps expects an integer"),
    (["--set", "training.nsteps=3"], "did you mean 'training.n_steps'"),
    (["--set", "data.batch_size=0"], "invalid data.batch_size 0"),
    (["--set", "training.lambda_qc=-1"], "invalid training.lambda_qc"),
    (["--set", "training.mixed_precision=bf16", "--device", "cpu"], "CUDA only"),
    (["--set", "data.dataset=cifar10"], "needs a root folder"),
    (["--init-from", "missing.pth"], "missing.pth"),
    (["--two-stage-backward", "--set", "training.estimator=exact"], "two-stage backward"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    code = main(["train", "--config", "digits-qcsbm", "--workdir", str(workdir), *args])

    stderr = capsys.readouterr().err
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert message in stderr
    assert not workdir.exists()


def test_unknown_preset_exits_2(tmp_path, capsys):
    code = main(["train", "--config", "cifar11-qcsbm", "--workdir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "did you mean 'cifar10-qcsbm'" in stderr


def test_resume_without_run_exits_2(tmp_path, capsys):
    code = main(["train", "--resume", "--workdir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "cannot resume" in stderr
    assert not (tmp_path / "run").exists()


def test_list_presets_prints_all(capsys):
    code = main(["train", "--list-presets"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert len(lines) == 15
    assert [line.split()[0] for line in lines] == list(PRESETS)
