"""The image trainer: exact resume, accumulation, fine-tuning, non-finite steps, presets."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qcsbm.checkpoints import load_checkpoint
from qcsbm.config import apply_overrides
from qcsbm.data.images_loader import ImageLoader
from qcsbm.errors import NonFiniteError, UsageError
from qcsbm.models import build_score_model, load_run
from qcsbm.presets import PRESETS, preset_config
from qcsbm.score_sde_format import load_score_sde_checkpoint
from qcsbm.trainer import (StepSettings, TrainingState, make_loader, make_objective,
                           make_optimizer, resume_config, train, training_step)
from qcsbm.training import make_ema

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ncsnpp"
TINY_CHECKPOINT = FIXTURES / "tiny" / "checkpoint.pth"

# A small NCSN++ on 8x8 digits: one resolution, no attention, nf 8.
TINY_DIGITS = ["model.nf=8", "model.ch_mult=1", "model.attn_resolutions=",
               "data.batch_size=8", "training.log_freq=1", "training.snapshot_freq=100"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: the tiny models here are slower with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(kind="qcsbm", *overrides):
    return apply_overrides(preset_config(f"digits-{kind}"), TINY_DIGITS + list(overrides))


def net_state(path):
    state = load_checkpoint(path)
    return state["model"], state["ema"]["state_dict"]


def assert_states_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --- resume -------------------------------------------------------------------------------

def test_resume_gives_identical_weights(tmp_path):
    # Dropout, flips, dequantization and Hutchinson probes exercise every random stream.
    cfg = tiny_config("qcsbm", "model.dropout=0.1", "data.random_flip=true",
                      "training.n_steps=6", "training.accumulate=2")

    full = train(cfg, tmp_path / "full", progress=False, device="cpu")
    assert full.status == "finished"
    assert full.step == 6

    first = train(apply_overrides(cfg, ["training.n_steps=3"]), tmp_path / "split",
                  progress=False, device="cpu")
    assert first.step == 3
    resumed_cfg = resume_config(tmp_path / "split", ["training.n_steps=6"])
    resumed = train(resumed_cfg, tmp_path / "split", resume=True, progress=False, device="cpu")
    assert resumed.step == 6

    full_model, full_ema = net_state(full.checkpoint_path)
    split_model, split_ema = net_state(resumed.checkpoint_path)
    assert_states_equal(full_model, split_model)
    assert_states_equal(full_ema, split_ema)

    # metrics.jsonl of the resumed run lists every step once, as the uninterrupted one.
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_rejects_changed_model(tmp_path):
    cfg = tiny_config("usbm", "training.n_steps=1")
    train(cfg, tmp_path / "run", progress=False, device="cpu")
    with pytest.raises(UsageError, match="cannot change model.nf"):
        resume_config(tmp_path / "run", ["model.nf=16"])


# --- gradient accumulation ----------------------------------------------------------------

def one_step_gradients(cfg, batch):
    torch.manual_seed(0)
    score_model, sde = build_score_model(cfg)
    optimizer, scheduler = make_optimizer(score_model, cfg)
    state = TrainingState(score_model=score_model, ema=make_ema(score_model, 0.999),
                          optimizer=optimizer, scheduler=scheduler, loader=None,
                          generator=torch.Generator().manual_seed(1))
    settings = StepSettings(sde=sde, objective=make_objective(cfg),
                            accumulate=cfg.training.accumulate, grad_clip=None)
    result = training_step(score_model, batch, state, settings, step=1)
    grads = {name: p.grad.clone() for name, p in score_model.named_parameters()
             if p.requires_grad}
    return result, grads


@pytest.mark.parametrize("kind, batch_size, extra", [
    ("usbm", 8, []),
    # The exact Jacobian costs 64 backward passes per image, so this batch is small.
    ("qcsbm", 2, ["training.estimator=exact", "training.lambda_qc=0.1"]),
])
def test_accumulation_matches_one_batch(kind, batch_size, extra):
    base = tiny_config(kind, "model.dropout=0", f"data.batch_size={batch_size}", *extra)
    batch = torch.rand(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    whole, whole_grads = one_step_gradients(base, batch)
    split, split_grads = one_step_gradients(
        apply_overrides(base, ["training.accumulate=2"]), batch)

    assert math.isclose(whole.loss, split.loss, rel_tol=1e-5)
    assert math.isclose(whole.penalty, split.penalty, rel_tol=1e-4, abs_tol=1e-12)
    if kind == "qcsbm":
        assert whole.penalty > 0
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)


# --- fine-tuning from a score_sde_pytorch checkpoint --------------------------------------

def fixture_images(path, count=16):
    images = np.random.default_rng(0).integers(0, 256, size=(count, 16, 16, 3), dtype=np.uint8)
    np.savez(path, images=images)
    return path


@pytest.mark.skipif(not TINY_CHECKPOINT.is_file(),
                    reason=f"score_sde_pytorch fixture not found at {TINY_CHECKPOINT}")
def test_init_from_score_sde_fixture(tmp_path):
    # The tiny fixture's architecture (its config.json): 16x16x3, nf 16, ch_mult (1, 2).
    fixture_config = json.loads((FIXTURES / "tiny" / "config.json").read_text())["model"]
    lr = 2e-4
    cfg = apply_overrides(preset_config("cifar10-qcsbm"), [
        "data.dataset=npz", f"data.path={fixture_images(tmp_path / 'images.npz')}",
        "data.image_size=16", "data.batch_size=4", "data.random_flip=false",
        f"model.nf={fixture_config['nf']}", "model.ch_mult=1,2", "model.num_res_blocks=1",
        "model.attn_resolutions=8", "model.dropout=0", "training.n_steps=2",
        "training.log_freq=1", f"optim.lr={lr}"])

    result = train(cfg, tmp_path / "run", init_from=TINY_CHECKPOINT, two_stage_backward=True,
                   progress=False, device="cpu")

    reference = load_score_sde_checkpoint(TINY_CHECKPOINT)
    state = load_checkpoint(result.checkpoint_path)
    assert state["config"]["training"]["init_from"] == str(TINY_CHECKPOINT)

    # Each Adam step moves a weight by at most about lr, so the run started from the
    # fixture's weights.
    changes = [(state["model"][k] - reference["model"][k]).abs().max().item()
               for k in reference["model"]]
    assert max(changes) <= 2 * lr * 1.01
    assert max(changes) > 0

    # The EMA continued the fixture's: after its 2 updates, update k decays by
    # (1 + k) / (10 + k). Undoing the two updates recovers a model one Adam step from both
    # the fixture's model and the final one.
    num_updates = reference["ema_num_updates"]
    assert state["ema"]["n_averaged"] == num_updates + 1 + 2
    decay1, decay2 = [(1 + k) / (10 + k) for k in (num_updates + 1, num_updates + 2)]
    trainable = [k for k in reference["model"] if k not in ("sigmas", "all_modules.0.W")]
    for key in trainable:
        ema0, ema2 = reference["ema"][key].double(), state["ema"]["state_dict"][key].double()
        model2 = state["model"][key].double()
        ema1 = (ema2 - (1 - decay2) * model2) / decay2
        model1 = ema0 + (ema1 - ema0) / (1 - decay1)
        assert (model1 - reference["model"][key].double()).abs().max() <= lr * 1.05, key
        assert (model2 - model1).abs().max() <= lr * 1.05, key

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(record["penalty"] > 0 for record in records)


def test_init_from_rejects_other_architecture(tmp_path):
    source = train(tiny_config("usbm", "training.n_steps=1"), tmp_path / "source",
                   progress=False, device="cpu")
    cfg = tiny_config("usbm", "model.nf=16", "training.n_steps=1")
    with pytest.raises(UsageError, match="does not match the model"):
        train(cfg, tmp_path / "target", init_from=source.checkpoint_path, progress=False,
              device="cpu")
    assert not (tmp_path / "target").exists()


# --- non-finite steps ---------------------------------------------------------------------

@pytest.fixture
def nan_second_batch(monkeypatch):
    """Make the loader's second batch of every epoch all NaN."""
    original = ImageLoader.batch

    def batch(self, epoch, batch_index):
        images = original(self, epoch, batch_index)
        return torch.full_like(images, math.nan) if batch_index == 1 else images

    monkeypatch.setattr(ImageLoader, "batch", batch)


def test_nonfinite_data_stops_with_message(tmp_path, nan_second_batch):
    cfg = tiny_config("qcsbm", "training.n_steps=4", "training.snapshot_freq=1")
    with pytest.raises(NonFiniteError) as raised:
        train(cfg, tmp_path / "run", progress=False, device="cpu")

    message = str(raised.value)
    assert "step 2" in message
    assert "DSM loss" in message
    assert "noise levels (std)" in message
    assert "ckpt_1.pt is kept" in message
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt_*.pt"))
    assert checkpoints == ["ckpt_1.pt"]


def test_nonfinite_step_skipped_when_asked(tmp_path, nan_second_batch):
    cfg = tiny_config("usbm", "training.n_steps=3", "training.on_nonfinite=skip")
    result = train(cfg, tmp_path / "run", progress=False, device="cpu")

    assert result.status == "finished"
    assert result.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))


# --- input checks and loading -------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=16"], "has images of 8x8 pixels"),
    (["training.mixed_precision=bf16"], "CUDA only"),
    (["data.batch_size=4096"], "invalid batch_size"),
])
def test_invalid_input_writes_nothing(tmp_path, overrides, message):
    cfg = tiny_config("usbm", *overrides)
    with pytest.raises(UsageError, match=message):
        train(cfg, tmp_path / "run", progress=False, device="cpu")
    assert not (tmp_path / "run").exists()


def test_load_run_returns_ema_weights(tmp_path):
    result = train(tiny_config("csbm", "training.n_steps=2"), tmp_path / "run",
                   progress=False, device="cpu")
    loaded = load_run(tmp_path / "run")
    _, ema = net_state(result.checkpoint_path)

    assert loaded.step == 2
    assert loaded.weights == "ema"
    assert loaded.data["num_levels"] == 17
    assert loaded.data["image_shape"] == [1, 8, 8]
    assert_states_equal(loaded.score_model.net.state_dict(), ema)
    assert not loaded.score_model.training
    score = loaded.score_model(torch.rand(2, 1, 8, 8), torch.full((2,), 0.5))
    assert score.shape == (2, 1, 8, 8)

    model, _ = net_state(result.checkpoint_path)
    raw = load_run(tmp_path / "run", use_ema=False, step=2)
    assert raw.weights == "model"
    assert_states_equal(raw.score_model.net.state_dict(), model)
    with pytest.raises(UsageError, match="no checkpoint of step 5"):
        load_run(tmp_path / "run", step=5)


def test_loader_is_seeded_by_training_seed(tmp_path):
    cfg = tiny_config("usbm")
    from qcsbm.trainer import load_training_images

    dataset = load_training_images(cfg)
    first = next(make_loader(dataset, cfg, torch.device("cpu")))
    again = next(make_loader(dataset, cfg, torch.device("cpu")))
    other = next(make_loader(dataset, apply_overrides(cfg, ["training.seed=5"]),
                             torch.device("cpu")))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# --- presets ------------------------------------------------------------------------------

def test_presets_cover_every_dataset_and_kind():
    names = set(PRESETS)
    for dataset in ("cifar10", "cifar100", "svhn", "imagenet32", "digits"):
        for kind in ("usbm", "csbm", "qcsbm"):
            assert f"{dataset}-{kind}" in names
    assert len(names) == 15


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_valid_config(name):
    cfg = preset_config(name)
    assert cfg.training.kind == name.rsplit("-", 1)[1]
    if cfg.training.kind == "qcsbm":
        assert cfg.training.lambda_qc > 0
    if cfg.training.kind == "csbm":
        assert not cfg.model.scale_by_sigma


def test_paper_qcsbm_preset_settings():
    cfg = preset_config("cifar10-qcsbm")
    assert (cfg.model.nf, cfg.model.ch_mult, cfg.model.num_res_blocks) == (128, (1, 2, 2, 2), 8)
    assert cfg.model.attn_resolutions == (16,)
    assert (cfg.sde.sigma_min, cfg.sde.sigma_max) == (0.01, 50.0)
    assert (cfg.training.lambda_qc, cfg.training.num_probes) == (1e-4, 1)
    assert cfg.data.batch_size == 128
    assert (cfg.optim.lr, cfg.optim.ema_rate) == (2e-4, 0.999)


def test_unknown_preset_suggests_name():
    with pytest.raises(UsageError, match="did you mean 'digits-qcsbm'"):
        preset_config("digits-qcsb")
