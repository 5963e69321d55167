"""Tests of qcsbm.checkpoints: atomic writes, safe loading, rotation, RNG state, key checks."""

import json
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from qcsbm import checkpoints
from qcsbm.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    check_state_dict_matches,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from qcsbm.errors import CheckpointError, UsageError


class _CreatesFileWhenUnpickled:
    """A malicious payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sample_state():
    return {
        "model": {"weight": torch.randn(3, 4), "bias": torch.zeros(4)},
        "step": 7,
        "lr": 2e-4,
        "name": "qcsbm",
        "history": [1.0, 2.5, None],
        "betas": (0.9, 0.999),
        "dtype": torch.float64,
    }


# --- save and load ------------------------------------------------------------------------

def test_round_trip_keeps_values(tmp_path):
    state = _sample_state()
    path = save_checkpoint(tmp_path / "a.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["step"] == 7
    assert loaded["lr"] == 2e-4
    assert loaded["name"] == "qcsbm"
    assert loaded["history"] == [1.0, 2.5, None]
    assert tuple(loaded["betas"]) == (0.9, 0.999)
    assert loaded["dtype"] is torch.float64


def test_round_trip_optimizer_state(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "a.pt", {"optimizer": optimizer.state_dict()})
    restored = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1.0)
    restored.load_state_dict(load_checkpoint(tmp_path / "a.pt")["optimizer"])
    assert restored.param_groups[0]["lr"] == 1e-3
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])


def test_save_rejects_non_plain_values(tmp_path):
    path = tmp_path / "a.pt"
    with pytest.raises(TypeError, match=r"state\['extra'\]\['array'\].*ndarray"):
        save_checkpoint(path, {"extra": {"array": np.zeros(3)}})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def crash(src, dst):
        raise KeyboardInterrupt("simulated kill between write and rename")

    monkeypatch.setattr(checkpoints.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()

    assert load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_manager_crash_keeps_pointer_on_complete_file(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(10, {"step": 10})

    def crash(src, dst):
        raise OSError("simulated failure of the rename")

    monkeypatch.setattr(checkpoints.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        manager.save(20, {"step": 20})
    monkeypatch.undo()

    assert manager.latest_path() == tmp_path / "ckpt_10.pt"
    assert manager.load_latest() == (tmp_path / "ckpt_10.pt", {"step": 10})
    assert [step for step, _ in manager.checkpoints()] == [10]


def test_killed_write_leftover_is_ignored_and_removed(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})

    # A hard kill skips the cleanup and leaves a partial temporary file behind.
    leftover = tmp_path / ".ckpt_2.pt.abc123.tmp"
    leftover.write_bytes(b"PK\x03\x04 partial")
    assert manager.latest_path() == tmp_path / "ckpt_1.pt"
    assert [step for step, _ in manager.checkpoints()] == [1]
    assert manager.load_latest()[1] == {"step": 1}

    manager.save(2, {"step": 2})
    assert not leftover.exists()


def test_truncated_file_raises(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", {"weight": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.pt.*truncated"):
        load_checkpoint(path)
    assert path.read_bytes() == data[: len(data) // 2]


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty or truncated"):
        load_checkpoint(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.pt not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_unreadable_file_raises(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "a.pt", {"step": 1})

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.torch, "load", deny)
    with pytest.raises(CheckpointError, match=r"a\.pt: the file cannot be read "
                                              r"\(Permission denied\)"):
        load_checkpoint(path)


def test_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_text_file_raises(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"notes\.pt.*corrupt"):
        load_checkpoint(path)


def test_foreign_torch_file_raises(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a qcsbm checkpoint"):
        load_checkpoint(path)


def test_newer_version_raises(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "version": 99, "state": {}}, path)
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        load_checkpoint(path)


def test_payload_creates_marker_when_unsafe(tmp_path):
    # Guards the malicious-pickle tests below: plain pickle.loads really runs the payload.
    marker = tmp_path / "proof_marker"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(marker), protocol=2)).close()
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_rejected(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"format": checkpoints.CHECKPOINT_FORMAT, "version": 1,
               "state": {"x": _CreatesFileWhenUnpickled(marker)}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    content = path.read_bytes()

    with pytest.raises(CheckpointError, match=r"evil\.pt.*unsafe.*open"):
        load_checkpoint(path)
    assert not marker.exists()
    assert path.read_bytes() == content


# --- rotation -----------------------------------------------------------------------------

def test_manager_keeps_newest_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (100, 200, 300, 400):
        manager.save(step, {"step": step})
    assert [step for step, _ in manager.checkpoints()] == [300, 400]
    pointer = json.loads((tmp_path / "latest.json").read_text())
    assert pointer["checkpoint"] == "ckpt_400.pt"
    assert pointer["step"] == 400
    assert manager.load_latest() == (tmp_path / "ckpt_400.pt", {"step": 400})


def test_manager_keep_none_keeps_all(tmp_path):
    manager = CheckpointManager(tmp_path, keep=None)
    for step in range(5):
        manager.save(step, {"step": step})
    assert [step for step, _ in manager.checkpoints()] == [0, 1, 2, 3, 4]


def test_manager_keeps_lower_step_just_written(tmp_path):
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(50, {"step": 50})
    manager.save(10, {"step": 10})
    assert [step for step, _ in manager.checkpoints()] == [10]
    assert manager.load_latest()[1] == {"step": 10}


def test_manager_sorts_steps_numerically(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (9, 10, 100):
        manager.save(step, {"step": step})
    assert [step for step, _ in manager.checkpoints()] == [10, 100]


def test_manager_rejects_bad_arguments(tmp_path):
    for keep in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="invalid keep"):
            CheckpointManager(tmp_path, keep=keep)
    manager = CheckpointManager(tmp_path)
    for step in (-1, 1.0, True):
        with pytest.raises(UsageError, match="invalid checkpoint step"):
            manager.save(step, {})


def test_manager_empty_directory(tmp_path):
    manager = CheckpointManager(tmp_path / "absent")
    assert manager.latest_path() is None
    assert manager.load_latest() is None


def test_pointer_to_corrupt_file_falls_back(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    (tmp_path / "ckpt_2.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="qcsbm.checkpoints"):
        loaded = manager.load_latest()
    assert loaded == (tmp_path / "ckpt_1.pt", {"step": 1})
    assert "ckpt_2.pt" in caplog.text


def test_pointer_to_missing_file_falls_back(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    (tmp_path / "ckpt_2.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="qcsbm.checkpoints"):
        assert manager.latest_path() == tmp_path / "ckpt_1.pt"
        assert manager.load_latest() == (tmp_path / "ckpt_1.pt", {"step": 1})
    assert "does not exist" in caplog.text


@pytest.mark.parametrize("pointer_text", [
    "{not json",
    '{"step": 3}',
    '{"checkpoint": "../outside.pt"}',
    '{"checkpoint": 5}',
])
def test_damaged_pointer_falls_back(tmp_path, pointer_text, caplog):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    (tmp_path / "latest.json").write_text(pointer_text)
    with caplog.at_level(logging.WARNING, logger="qcsbm.checkpoints"):
        assert manager.latest_path() == tmp_path / "ckpt_2.pt"
        assert manager.load_latest()[1] == {"step": 2}
    assert "pointer" in caplog.text


def test_no_loadable_checkpoint_lists_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    for name in ("ckpt_1.pt", "ckpt_2.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no loadable.*ckpt_2\.pt.*ckpt_1\.pt"):
        manager.load_latest()


# --- random number generator state --------------------------------------------------------

def _draw_all(numpy_generator, torch_generator):
    cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else None
    return (
        cuda,
        torch.rand(5).tolist(),
        torch.randn(3, generator=torch_generator).tolist(),
        np.random.rand(4).tolist(),
        np.random.randn(2).tolist(),  # also exercises the cached Gaussian of the legacy state
        numpy_generator.random(4).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
    )


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
def test_rng_restore_through_checkpoint(tmp_path, bit_generator):
    numpy_generator = np.random.Generator(bit_generator(123))
    torch_generator = torch.Generator().manual_seed(5)
    np.random.randn(1)  # leave a cached Gaussian in NumPy's legacy state
    random.gauss(0.0, 1.0)

    state = capture_rng_state(numpy_generator=numpy_generator, torch_generator=torch_generator)
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    first = _draw_all(numpy_generator, torch_generator)

    # Advance every stream further so that a missing restore would show.
    _draw_all(numpy_generator, torch_generator)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"],
                      numpy_generator=numpy_generator, torch_generator=torch_generator)
    second = _draw_all(numpy_generator, torch_generator)
    assert second == first


def test_rng_restore_requires_captured_generator():
    state = capture_rng_state()
    with pytest.raises(CheckpointError, match="numpy_generator"):
        restore_rng_state(state, numpy_generator=np.random.default_rng(0))
    with pytest.raises(CheckpointError, match="torch_generator"):
        restore_rng_state(state, torch_generator=torch.Generator())


def test_rng_restore_rejects_other_bit_generator():
    state = capture_rng_state(numpy_generator=np.random.Generator(np.random.PCG64(0)))
    with pytest.raises(CheckpointError, match="'PCG64'.*'MT19937'"):
        restore_rng_state(state, numpy_generator=np.random.Generator(np.random.MT19937(0)))


def test_rng_restore_rejects_incomplete_state():
    state = capture_rng_state()
    del state["python"]
    with pytest.raises(CheckpointError, match="'python' is missing"):
        restore_rng_state(state)


# --- model compatibility ------------------------------------------------------------------

def _net(width):
    return nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, 2))


def test_matching_state_dict_passes():
    check_state_dict_matches(_net(8), _net(8).state_dict(), "model.pt")


def test_shape_mismatch_names_file_and_shapes():
    with pytest.raises(CheckpointError) as info:
        check_state_dict_matches(_net(8), _net(16).state_dict(), "other.pt")
    message = str(info.value)
    assert "other.pt" in message
    assert "3 shape mismatches" in message
    assert "0.weight (checkpoint (16, 2), model (8, 2))" in message


def test_missing_and_unexpected_keys():
    state = _net(8).state_dict()
    state["3.weight"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(CheckpointError) as info:
        check_state_dict_matches(_net(8), state, "x.pt")
    message = str(info.value)
    assert "1 missing key: 2.bias" in message
    assert "1 unexpected key: 3.weight" in message


def test_long_key_lists_are_shortened():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    with pytest.raises(CheckpointError, match="10 missing keys: .* and 5 more"):
        check_state_dict_matches(model, {}, "x.pt")


def test_distributed_prefix_gets_hint():
    state = {f"module.{key}": value for key, value in _net(8).state_dict().items()}
    with pytest.raises(CheckpointError, match="prefix 'module.'.*DistributedDataParallel"):
        check_state_dict_matches(_net(8), state, "ddp.pt")


def test_write_atomic_cleans_up_on_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def failing_write(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.write_atomic(path, failing_write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_write_atomic_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "a.pt", {"step": 1})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def _train(manager, *, n_steps, snapshot_freq, resume):
    """Train a tiny noisy regression, checkpointing like a training loop; return the weights."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    numpy_generator = np.random.default_rng(1)
    start = 0
    if resume:
        _, state = manager.load_latest()
        check_state_dict_matches(model, state["model"], "latest")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], numpy_generator=numpy_generator)
        start = state["step"]

    for step in range(start, n_steps):
        x = torch.randn(8, 3) + float(numpy_generator.normal())
        loss = (model(x).squeeze(1) - x.sum(dim=1) * random.random()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % snapshot_freq == 0:
            manager.save(step + 1, {"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "step": step + 1,
                                    "rng": capture_rng_state(numpy_generator=numpy_generator)})
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resumed_run_matches_uninterrupted(tmp_path):
    random.seed(3)
    uninterrupted = _train(CheckpointManager(tmp_path / "a"), n_steps=12, snapshot_freq=4,
                           resume=False)

    random.seed(3)
    manager = CheckpointManager(tmp_path / "b")
    _train(manager, n_steps=7, snapshot_freq=4, resume=False)  # stops after 7 steps
    random.seed(12345)  # the new process starts from another state; the checkpoint restores it
    resumed = _train(manager, n_steps=12, snapshot_freq=4, resume=True)
    assert torch.equal(resumed, uninterrupted)
