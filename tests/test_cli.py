"""The top-level `qcsbm` command: --version, --help and a missing command."""

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


def test_missing_command_prints_usage_on_stderr(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: qcsbm")


def test_unknown_command_is_one_line():
    result = subprocess.run([sys.executable, "-m", "qcsbm", "fly"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "'fly'" in result.stderr


def console_script():
    """The installed `qcsbm` script: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "qcsbm"
    return str(beside) if beside.exists() else shutil.which("qcsbm")


@pytest.mark.skipif(console_script() is None, reason="the qcsbm console script is not installed")
def test_console_script_runs():
    result = subprocess.run([console_script(), "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"qcsbm {qcsbm.__version__}"
