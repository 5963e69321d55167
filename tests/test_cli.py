"""The top-level `qcsbm` command: --version, --help, bad commands and cleanup after failures."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qcsbm
from qcsbm.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"qcsbm {qcsbm.__version__}"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("study", "train", "sample", "eval", "import-checkpoint"):
        assert command in out


def test_missing_command_one_line(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "missing COMMAND" in captured.err


def test_unknown_command_is_one_line():
    result = subprocess.run([sys.executable, "-m", "qcsbm", "fly"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "'fly'" in result.stderr


def console_script():
    """Return the installed `qcsbm` script: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "qcsbm"
    return str(beside) if beside.exists() else shutil.which("qcsbm")


@pytest.mark.skipif(console_script() is None, reason="the qcsbm console script is not installed")
def test_console_script_runs():
    result = subprocess.run([console_script(), "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"qcsbm {qcsbm.__version__}"


def test_failed_study_removes_folder(tmp_path, capsys):
    # A huge learning rate makes the penalty NaN at the first step.
    out = tmp_path / "autoencoder"
    code = main(["study", "autoencoder", "--preset", "quick", "--out", str(out), "--lr",
                 "1e300", "--quiet"])
    assert code == 3
    assert "nan" in capsys.readouterr().err
    assert not out.exists()


def test_failed_study_empties_existing_folder(tmp_path):
    out = tmp_path / "toy2d"
    out.mkdir()
    code = main(["study", "toy2d", "--preset", "quick", "--models", "usbm", "--out", str(out),
                 "--sigma-max", "1e300", "--quiet"])
    assert code == 3
    assert out.is_dir()
    assert list(out.iterdir()) == []


def test_overflow_error_one_line(tmp_path, capsys):
    out = tmp_path / "gaussian"
    code = main(["study", "gaussian", "--preset", "quick", "--out", str(out), "--sigma",
                 "1e300", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "out of range" in err
    assert not out.exists()


def test_failed_training_removes_run_folder(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["train", "--config", "digits-qcsbm", "--workdir", str(workdir), "--quiet",
                 "--set", "training.n_steps=3", "--set", "data.batch_size=8",
                 "--set", "model.nf=8", "--set", "model.ch_mult=1",
                 "--set", "model.attn_resolutions=", "--set", "sde.sigma_max=1e300"])
    assert code == 3
    assert "non-finite" in capsys.readouterr().err
    assert not workdir.exists()
