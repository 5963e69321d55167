"""Safe loading of score_sde_pytorch checkpoints and their name-less EMA list."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from qcsbm.errors import CheckpointError
from qcsbm.nets import NCSNpp
from qcsbm.score_sde_format import (
    check_compatible,
    load_score_sde_checkpoint,
    strip_data_parallel_prefix,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ncsnpp"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"score_sde_pytorch NCSN++ fixtures not found at {FIXTURES}")

TINY = FIXTURES / "tiny" / "checkpoint.pth"


def fixture_net(name):
    return NCSNpp.from_score_sde_config(json.loads((FIXTURES / name / "config.json").read_text()))


@pytest.fixture(scope="module")
def raw_tiny():
    return torch.load(TINY, weights_only=True)


def save_variant(raw, path, **changes):
    """Write a copy of the raw checkpoint with entries replaced (None deletes an entry)."""
    checkpoint = dict(raw)
    for key, value in changes.items():
        if value is None:
            checkpoint.pop(key)
        else:
            checkpoint[key] = value
    torch.save(checkpoint, path)
    return path


class RunsCodeOnLoad:
    """Unpickling this object creates the file `marker` (a harmless stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------------------
# Valid checkpoints


def test_loaded_entries(raw_tiny):
    loaded = load_score_sde_checkpoint(TINY)
    assert loaded["step"] == 2
    assert loaded["ema_decay"] == 0.999
    assert loaded["ema_num_updates"] == 2
    assert list(loaded["model"]) == [k.removeprefix("module.") for k in raw_tiny["model"]]
    assert list(loaded["ema"]) == list(loaded["model"])
    assert loaded["optimizer"]["param_groups"] == raw_tiny["optimizer"]["param_groups"]


def test_ema_follows_param_order_file(raw_tiny):
    loaded = load_score_sde_checkpoint(TINY)
    shadow = raw_tiny["ema"]["shadow_params"]
    rows = [line.split("\t") for line in
            (FIXTURES / "tiny" / "param_order.txt").read_text().splitlines()
            if line and not line.startswith("#")]

    for _, ema_index, key, _ in rows:
        name = key.removeprefix("module.")
        if ema_index == "-":
            torch.testing.assert_close(loaded["ema"][name], loaded["model"][name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(loaded["ema"][name], shadow[int(ema_index)], rtol=0, atol=0)
    torch.testing.assert_close(loaded["ema"]["sigmas"], loaded["model"]["sigmas"], rtol=0, atol=0)

    # The fixture's EMA differs clearly from the model weights, so the mapping is visible.
    differ = [k for k in loaded["model"] if not torch.equal(loaded["model"][k], loaded["ema"][k])]
    assert len(differ) > 100


@pytest.mark.parametrize("prefixed", [True, False])
def test_loads_strictly_with_and_without_prefix(raw_tiny, tmp_path, prefixed):
    model = raw_tiny["model"] if prefixed else strip_data_parallel_prefix(raw_tiny["model"])
    path = save_variant(raw_tiny, tmp_path / "checkpoint.pth", model=model)
    loaded = load_score_sde_checkpoint(path)

    net = fixture_net("tiny")
    net.load_state_dict(loaded["model"], strict=True)
    net.load_state_dict(loaded["ema"], strict=True)
    check_compatible(net, loaded["model"], path)


def test_checkpoint_without_step(raw_tiny, tmp_path):
    path = save_variant(raw_tiny, tmp_path / "qcsbm.pth", step=None)
    loaded = load_score_sde_checkpoint(path)
    assert loaded["step"] is None
    assert list(loaded["model"]) == list(loaded["ema"])


def test_optimizer_state_reloads_into_adam():
    loaded = load_score_sde_checkpoint(TINY)
    net = fixture_net("tiny")
    net.load_state_dict(loaded["model"])
    optimizer = torch.optim.Adam(net.parameters())
    optimizer.load_state_dict(loaded["optimizer"])

    # Adam state id i is the i-th entry of parameters(). Id 0, the frozen Fourier W, has none.
    params = list(net.parameters())
    assert 0 not in loaded["optimizer"]["state"]
    assert optimizer.state[params[1]]["exp_avg"].shape == params[1].shape


# ----------------------------------------------------------------------------------------------
# Rejected files


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="not found.*absent.pth"):
        load_score_sde_checkpoint(path)


def test_directory_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_score_sde_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"", b"plain text, not a checkpoint"])
def test_foreign_bytes_rejected(tmp_path, content):
    path = tmp_path / "foreign.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="foreign.pth.*not a PyTorch checkpoint"):
        load_score_sde_checkpoint(path)


def test_truncated_file_rejected(tmp_path):
    data = TINY.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*may be truncated"):
        load_score_sde_checkpoint(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_in_pickle_rejected_and_not_run(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = {"model": RunsCodeOnLoad(marker), "ema": {}, "optimizer": {}}
    path = tmp_path / "malicious.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        # Protocol 2 is the one torch's legacy format uses, so the unpickler reaches the global.
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(CheckpointError,
                       match="malicious.pth.*weights_only=True.*Unsupported global"):
        load_score_sde_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    (torch.zeros(3), "expected a dict"),
    ({"ema": {}, "optimizer": {}}, "expected a dict"),
    ({"model": {"w": [1, 2]}, "ema": {}}, "'model' must map"),
])
def test_non_checkpoint_content_rejected(tmp_path, content, match):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_score_sde_checkpoint(path)


def test_missing_ema_rejected(raw_tiny, tmp_path):
    path = save_variant(raw_tiny, tmp_path / "no_ema.pth", ema=None)
    with pytest.raises(CheckpointError, match="no_ema.pth.*'ema' entry is missing"):
        load_score_sde_checkpoint(path)


def test_short_ema_list_rejected(raw_tiny, tmp_path):
    ema = dict(raw_tiny["ema"], shadow_params=raw_tiny["ema"]["shadow_params"][:-1])
    path = save_variant(raw_tiny, tmp_path / "short_ema.pth", ema=ema)
    with pytest.raises(CheckpointError, match="short_ema.pth.*155 tensors.*156 trainable"):
        load_score_sde_checkpoint(path)


def test_ema_shape_mismatch_rejected(raw_tiny, tmp_path):
    shadow = list(raw_tiny["ema"]["shadow_params"])
    shadow[0] = shadow[0].T.contiguous()
    ema = dict(raw_tiny["ema"], shadow_params=shadow)
    path = save_variant(raw_tiny, tmp_path / "bad_shape.pth", ema=ema)
    with pytest.raises(CheckpointError, match=r"all_modules.1.weight.*\(32, 64\)"):
        load_score_sde_checkpoint(path)


def test_mixed_prefix_rejected(raw_tiny, tmp_path):
    model = dict(raw_tiny["model"])
    model["extra"] = torch.zeros(1)
    path = save_variant(raw_tiny, tmp_path / "mixed.pth", model=model)
    with pytest.raises(CheckpointError, match="only some keys.*'extra'"):
        load_score_sde_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Compatibility check


def test_check_compatible_lists_every_problem():
    loaded = load_score_sde_checkpoint(TINY)
    state = dict(loaded["model"])
    state.pop("all_modules.19.bias")
    state["all_modules.99.weight"] = torch.zeros(1)
    state["all_modules.3.weight"] = torch.zeros(16, 3, 5, 5)

    with pytest.raises(CheckpointError) as caught:
        check_compatible(fixture_net("tiny"), state, "tiny.pth")
    message = str(caught.value)
    assert "'tiny.pth'" in message
    assert "1 missing keys (all_modules.19.bias)" in message
    assert "1 unexpected keys (all_modules.99.weight)" in message
    assert "all_modules.3.weight: checkpoint (16, 3, 5, 5), network (16, 3, 3, 3)" in message


def test_check_compatible_wrong_architecture():
    loaded = load_score_sde_checkpoint(TINY)
    with pytest.raises(CheckpointError, match=r"missing keys .* and \d+ more"):
        check_compatible(fixture_net("small"), loaded["model"], TINY)
