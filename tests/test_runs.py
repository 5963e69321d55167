"""Tests of qcsbm.runs: run folder rules and graceful stopping on signals."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from qcsbm import runs
from qcsbm.errors import UsageError
from qcsbm.runs import GracefulStop, is_run_dir, prepare_run_dir


def _make_resumable(run_dir: Path) -> None:
    (run_dir / "config.json").write_text("{}")
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "ckpt_10.pt").write_bytes(b"checkpoint")


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- prepare_run_dir ----------------------------------------------------------------------

def test_new_directory_is_created_with_marker(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "b")
    assert run.path == tmp_path / "a" / "b"
    assert run.resumed is False
    assert is_run_dir(run.path)
    marker = json.loads(run.marker_path.read_text())
    assert marker["format"] == "qcsbm-run"
    assert run.config_path == run.path / "config.json"
    assert run.checkpoint_dir == run.path / "checkpoints"


def test_existing_empty_directory_is_used(tmp_path):
    run = prepare_run_dir(tmp_path)
    assert is_run_dir(tmp_path)
    assert run.resumed is False


def test_non_empty_directory_needs_a_flag(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty; pass --resume .* or --overwrite"):
        prepare_run_dir(tmp_path)
    assert _tree(tmp_path) == ["notes.txt"]


def test_overwrite_refuses_unmarked_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError, match="cannot overwrite .*no .qcsbm-run marker"):
        prepare_run_dir(tmp_path, overwrite=True)
    assert _tree(tmp_path) == ["notes.txt", "sub"]


def test_overwrite_clears_a_run(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir)
    _make_resumable(run_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("not part of the run")
    (run_dir / "link").symlink_to(outside, target_is_directory=True)

    run = prepare_run_dir(run_dir, overwrite=True)
    assert run.resumed is False
    assert _tree(run_dir) == [".qcsbm-run"]
    assert (outside / "data.txt").read_text() == "not part of the run"


def test_overwrite_of_missing_directory_creates_it(tmp_path):
    run = prepare_run_dir(tmp_path / "new", overwrite=True)
    assert is_run_dir(run.path)


def test_resume_existing_run(tmp_path):
    prepare_run_dir(tmp_path)
    _make_resumable(tmp_path)
    before = _tree(tmp_path)
    run = prepare_run_dir(tmp_path, resume=True)
    assert run.resumed is True
    assert _tree(tmp_path) == before


def test_resume_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="cannot resume: .* does not exist"):
        prepare_run_dir(tmp_path / "absent", resume=True)
    assert not (tmp_path / "absent").exists()


def test_resume_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="cannot resume: .* has no config.json"):
        prepare_run_dir(tmp_path, resume=True)


def test_resume_without_checkpoint(tmp_path):
    prepare_run_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".ckpt_5.pt.x1.tmp").write_bytes(b"partial")
    with pytest.raises(UsageError, match="no checkpoint in checkpoints/; pass --overwrite"):
        prepare_run_dir(tmp_path, resume=True)


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(UsageError, match="exclude each other"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)


def test_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        prepare_run_dir(path)


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot create run directory .*writable location"):
        prepare_run_dir(tmp_path / "file" / "run")


def test_parent_without_permission(tmp_path, monkeypatch):
    # Root ignores directory permissions, so the denial is simulated at mkdir.
    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(runs.Path, "mkdir", deny)
    with pytest.raises(UsageError, match="cannot create run directory .*Permission denied"):
        prepare_run_dir(tmp_path / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs a non-root POSIX user for permission bits to apply")
def test_read_only_parent(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="cannot create run directory"):
            prepare_run_dir(parent / "run")
    finally:
        parent.chmod(0o700)


# --- GracefulStop -------------------------------------------------------------------------

def test_first_signal_sets_flag():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.stop_requested is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested is True
        assert stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_signal_stops_at_once():
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        with GracefulStop() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.stop_requested is True
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("the second signal did not interrupt")
    assert signal.getsignal(signal.SIGINT) == before_int
    assert signal.getsignal(signal.SIGTERM) == before_term


def test_handlers_restored_after_exception():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError):
        with GracefulStop():
            assert signal.getsignal(signal.SIGINT) != before
            raise RuntimeError("step failed")
    assert signal.getsignal(signal.SIGINT) == before


def test_outside_main_thread_does_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with GracefulStop() as stop:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(stop.stop_requested)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, False]
