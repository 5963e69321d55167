"""DDP training steps on 2 CPU ranks (gloo) against one process on the combined batch.

One pair of worker processes runs every case (starting processes dominates the cost), saves
its gradients and parameters, and each test compares one case with a single-process
reference that uses the combined batch with the same t, noise and Hutchinson probes.
Everything runs in float64, so agreement is to rounding (1e-12).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qcsbm import distributed
from qcsbm.checkpoints import load_checkpoint
from qcsbm.errors import UsageError
from qcsbm.losses import Objective, backward_two_stage, qc_loss
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE

WORLD_SIZE = 2
BATCH = 8                      # the combined batch; each rank takes BATCH // WORLD_SIZE
DIM = 2
LR = 0.1                       # plain SGD, so a wrong gradient scale shows in the parameters
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


class TinyNet(nn.Module):
    """A 2-D score network; `unused` adds a layer that the forward pass never calls."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.hidden = nn.Linear(DIM + 1, 16)
        self.head = nn.Linear(16, DIM)    # head.bias reaches the DSM term only
        self.unused = nn.Linear(DIM, DIM) if unused else None

    def forward(self, x, cond):
        h = torch.cat([x, cond.log().unsqueeze(1)], dim=1)
        return self.head(torch.tanh(self.hidden(h)))


# name: (model kind, Objective keywords, backward, micro-batches, unused layer).
# backward "single" is one backward() per micro-batch, "two-stage" the two backward() calls of
# qcsbm.losses.backward_two_stage.
# penalty_fraction < 1 makes qc_loss call the model twice before one backward pass.
CASES = {
    "usbm": ("usbm", dict(lambda_qc=0.0), "single", 1, False),
    "csbm": ("csbm", dict(lambda_qc=0.0), "single", 1, False),
    "qcsbm_nonnegative": ("usbm", dict(lambda_qc=1.0, estimator="nonnegative", jvp="forward"),
                          "single", 1, False),
    "qcsbm_double_backward_fraction": ("usbm", dict(lambda_qc=1.0, estimator="nonnegative",
                                                    jvp="double-backward",
                                                    penalty_fraction=0.5), "single", 1, False),
    "qcsbm_two_stage": ("usbm", dict(lambda_qc=1.0, estimator="hutchinson"), "two-stage", 1,
                        False),
    "qcsbm_unused_layer": ("usbm", dict(lambda_qc=1.0, estimator="nonnegative"), "single", 1,
                           True),
    "qcsbm_accumulate": ("usbm", dict(lambda_qc=1.0, estimator="nonnegative"), "single", 2,
                         False),
    "qcsbm_two_stage_accumulate": ("usbm", dict(lambda_qc=1.0, estimator="hutchinson"),
                                   "two-stage", 2, False),
}

# The two-stage backward left to DDP's own reduction, which is wrong (see its test).
UNSYNCED_TWO_STAGE = ("usbm", dict(lambda_qc=1.0, estimator="hutchinson"),
                      "two-stage-ddp-only", 1, False)


def make_model(kind: str, unused: bool):
    torch.manual_seed(0)
    sde = VESDE(sigma_min=0.01, sigma_max=5.0, t_min=1e-5)
    net = TinyNet(unused).double()
    if kind == "csbm":
        return EnergyScore(net, sde, form="residual"), sde
    return UnconstrainedScore(net, sde, output="residual"), sde


def combined_batch():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(BATCH, generator=gen, dtype=torch.float64)
    noise = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    return x0, t, noise


def probe_generator(first_sample: int) -> torch.Generator:
    """A generator whose next Rademacher probes are those of samples first_sample, ... .

    torch's CPU generator fills randint tensors in order, so skipping first_sample * DIM
    draws makes a shard's probes equal the matching rows of the combined batch's probes.
    """
    gen = torch.Generator().manual_seed(2)
    torch.randint(0, 2, (1, first_sample, DIM), generator=gen)
    return gen


def backward_micro_batch(model, sde, x0, t, noise, objective, gen, backward, scale):
    if backward.startswith("two-stage"):
        backward_two_stage(model, sde, x0, objective, t=t, noise=noise, generator=gen,
                           loss_scale=scale)
    else:
        terms = qc_loss(model, sde, x0, objective, t=t, noise=noise, generator=gen)
        (terms.total * scale).backward()


def backward_step(model, sde, case, rows: slice, scale: float = 1.0) -> None:
    """Accumulate the gradients of one step on the samples `rows`, times `scale`."""
    _, objective_args, backward, num_micro, _ = case
    averaged = backward == "two-stage"
    objective = Objective(**objective_args)
    x0, t, noise = (tensor[rows] for tensor in combined_batch())
    gen = probe_generator(rows.start)

    contexts = distributed.micro_batch_contexts(model, num_micro, two_stage=averaged)
    parts = zip(x0.chunk(num_micro), t.chunk(num_micro), noise.chunk(num_micro), contexts)
    for x_part, t_part, noise_part, context in parts:
        with context:
            backward_micro_batch(model, sde, x_part, t_part, noise_part, objective, gen,
                                 backward, scale / num_micro)
    if averaged:
        distributed.average_gradients(model)


def sgd_step(model):
    """Take a plain SGD step and return copies of (gradients, parameters)."""
    inner = distributed.unwrap_model(model)
    grads = {name: None if p.grad is None else p.grad.clone()
             for name, p in inner.named_parameters()}
    with torch.no_grad():
        for p in inner.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    params = {name: p.detach().clone() for name, p in inner.named_parameters()}
    return grads, params


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = distributed.init_distributed("cpu", timeout_s=120)
    results = {"context": (context.rank, context.world_size, context.backend,
                           context.is_main_process)}
    shard = BATCH // WORLD_SIZE
    rows = slice(rank * shard, (rank + 1) * shard)
    try:
        for name, case in [*CASES.items(), ("two_stage_reduced_by_ddp", UNSYNCED_TWO_STAGE)]:
            kind, _, _, _, unused = case
            score_model, sde = make_model(kind, unused)
            model = distributed.wrap_model(score_model, context, find_unused_parameters=unused)
            try:
                backward_step(model, sde, case, rows)
                results[name] = sgd_step(model)
            except Exception as error:   # reported by the test of that case
                results[name] = repr(error)
            context.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        distributed.cleanup_distributed()


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
            for rank in range(WORLD_SIZE)]


def reference(name: str):
    """Return (gradients, parameters) of one process on the combined batch.

    penalty_fraction < 1 penalizes the leading samples of each rank's batch, so for that
    case the reference averages the gradients of the ranks' shards instead.
    """
    kind, objective_args, _, _, unused = CASES[name]
    score_model, sde = make_model(kind, unused)
    if objective_args.get("penalty_fraction", 1.0) == 1.0:
        backward_step(score_model, sde, CASES[name], slice(0, BATCH))
        return sgd_step(score_model)

    shard = BATCH // WORLD_SIZE
    for rank in range(WORLD_SIZE):
        rows = slice(rank * shard, (rank + 1) * shard)
        backward_step(score_model, sde, CASES[name], rows, scale=1.0 / WORLD_SIZE)
    return sgd_step(score_model)


def assert_same(actual: dict, expected: dict, label: str) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, f"{label} {key}: expected None"
        else:
            assert actual[key] is not None, f"{label} {key}: missing"
            torch.testing.assert_close(actual[key], value, **TOLERANCE, msg=f"{label} {key}")


def test_context_on_each_rank(rank_results):
    for rank, results in enumerate(rank_results):
        assert results["context"] == (rank, WORLD_SIZE, "gloo", rank == 0)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_step_matches_one_process(rank_results, name):
    expected_grads, expected_params = reference(name)
    for rank, results in enumerate(rank_results):
        assert not isinstance(results[name], str), f"rank {rank} failed: {results[name]}"
        grads, params = results[name]
        assert_same(grads, expected_grads, f"rank {rank} gradient of")
        assert_same(params, expected_params, f"rank {rank} parameter")


def test_unused_layer_gets_no_gradient(rank_results):
    grads, _ = rank_results[0]["qcsbm_unused_layer"]
    assert grads["net.unused.weight"] is None
    assert grads["net.unused.bias"] is None


def test_penalty_changes_gradients():
    # The QC cases would not test the penalty's reduction if it left the gradients unchanged.
    with_penalty, _ = reference("qcsbm_nonnegative")
    without, _ = reference("usbm")
    assert not torch.allclose(with_penalty["net.hidden.weight"], without["net.hidden.weight"])
    torch.testing.assert_close(with_penalty["net.head.bias"], without["net.head.bias"], **TOLERANCE)


def test_two_stage_needs_average_gradients(rank_results):
    # Without average_gradients DDP reduces only the first of the two backward passes, so the
    # ranks keep different gradients: the reason the two-stage path turns DDP's reduction off.
    expected_grads, _ = reference("qcsbm_two_stage")
    grads = [results["two_stage_reduced_by_ddp"][0] for results in rank_results]
    name = "net.hidden.weight"
    assert not torch.allclose(grads[0][name], grads[1][name])
    assert not torch.allclose(grads[0][name], expected_grads[name])


# --- single-process helpers --------------------------------------------------------------


def test_init_without_torchrun_is_single_process(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    context = distributed.init_distributed("cpu")
    assert context == distributed.DistributedContext(device=torch.device("cpu"))
    assert not context.is_distributed
    assert context.is_main_process
    context.barrier()


@pytest.mark.parametrize("env, fragment", [
    (dict(WORLD_SIZE="two"), "WORLD_SIZE='two'"),
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), "MASTER_ADDR, MASTER_PORT"),
    (dict(WORLD_SIZE="2", RANK="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
          MASTER_PORT="1"), "RANK=2"),
])
def test_init_rejects_bad_environment(monkeypatch, env, fragment):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=fragment):
        distributed.init_distributed("cpu")


def test_init_rejects_nccl_on_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(UsageError, match="'nccl'"):
        distributed.init_distributed("cpu", backend="nccl")


def test_rank_batch_size():
    assert distributed.rank_batch_size(8, 2) == 4
    assert distributed.rank_batch_size(8, 2, accumulate=2) == 4
    assert distributed.rank_batch_size(6, 1, accumulate=3) == 6
    with pytest.raises(UsageError, match="that is by 4"):
        distributed.rank_batch_size(6, 2, accumulate=2)


def test_rank_seed_differs_per_rank():
    seeds = [distributed.rank_seed(42, rank) for rank in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [distributed.rank_seed(42, rank) for rank in range(4)]
    assert distributed.rank_seed(43, 0) not in seeds
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert distributed.rank_seed(42, 0, 7) != distributed.rank_seed(42, 0, 8)


def test_rank_generator_streams():
    first = torch.rand(4, generator=distributed.rank_generator(0, 1, 5))
    again = torch.rand(4, generator=distributed.rank_generator(0, 1, 5))
    other_rank = torch.rand(4, generator=distributed.rank_generator(0, 0, 5))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other_rank)


def test_contexts_without_ddp_are_no_ops():
    model = nn.Linear(2, 2)
    contexts = distributed.micro_batch_contexts(model, 3, two_stage=True)
    assert len(contexts) == 3
    assert all(isinstance(c, contextlib.nullcontext) for c in contexts)
    assert distributed.unwrap_model(model) is model
    with pytest.raises(UsageError, match="num_micro_batches 0"):
        distributed.micro_batch_contexts(model, 0)


# --- mixed precision -----------------------------------------------------------------------


def test_autocast_penalty_stays_float32():
    score_model, sde = make_model("usbm", False)
    score_model.float()
    objective = Objective(lambda_qc=1.0, estimator="nonnegative", penalty_fraction=0.5)
    x0, t, noise = (tensor.float() for tensor in combined_batch())

    expected = qc_loss(score_model, sde, x0, objective, t=t, noise=noise,
                       generator=probe_generator(0))
    mixed = distributed.autocast_qc_loss(score_model, sde, x0, objective, t=t, noise=noise,
                                         generator=probe_generator(0), device_type="cpu")

    # The penalty is computed outside autocast: the same float32 numbers as without it.
    assert mixed.penalty.dtype == torch.float32
    torch.testing.assert_close(mixed.penalty, expected.penalty, rtol=1e-6, atol=1e-7)

    # The DSM term went through bfloat16: close, but not equal.
    assert mixed.dsm.dtype == torch.float32
    torch.testing.assert_close(mixed.dsm, expected.dsm, rtol=5e-2, atol=1e-2)
    assert not torch.equal(mixed.dsm, expected.dsm)

    mixed.total.backward()
    assert score_model.net.hidden.weight.grad is not None


def test_autocast_disabled_matches_qc_loss():
    score_model, sde = make_model("usbm", False)
    objective = Objective(lambda_qc=0.5, estimator="hutchinson", num_probes=2)
    x0, _, _ = combined_batch()

    expected = qc_loss(score_model, sde, x0, objective, generator=torch.Generator().manual_seed(3))
    mixed = distributed.autocast_qc_loss(score_model, sde, x0, objective,
                                         generator=torch.Generator().manual_seed(3),
                                         device_type="cpu", enabled=False)
    torch.testing.assert_close(mixed.t, expected.t, rtol=0, atol=0)
    torch.testing.assert_close(mixed.dsm, expected.dsm, **TOLERANCE)
    torch.testing.assert_close(mixed.penalty, expected.penalty, **TOLERANCE)
    torch.testing.assert_close(mixed.total, expected.total, **TOLERANCE)


# --- qcsbm train under torchrun ------------------------------------------------------------


def run_train(workdir, *args, nproc: int | None = 2, wait: bool = True):
    """Start `qcsbm train` under torchrun with `nproc` processes, or without it for None."""
    launcher = [sys.executable, "-m", "qcsbm"]
    if nproc is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "qcsbm"]
    command = [*launcher, "train", "--workdir", str(workdir), "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_steps(workdir) -> list[int]:
    names = (workdir / "checkpoints").glob("ckpt_*.pt")
    return sorted(int(path.stem.split("_")[1]) for path in names)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchrun") / "run"
    result = run_train(workdir, "--config", "digits-qcsbm", "--set", "training.n_steps=3",
                       "--set", "data.batch_size=8")
    return workdir, result


@pytest.mark.slow
def test_torchrun_train_writes_one_checkpoint(torchrun_run):
    workdir, result = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [3]
    saved = load_checkpoint(workdir / "checkpoints" / "ckpt_3.pt")
    assert saved["step"] == 3
    assert saved["loader"]["world_size"] == 2
    assert saved["loader"]["batch_size"] == 4
    assert "rank 1 of 2" in result.stderr


@pytest.mark.slow
def test_torchrun_stop_then_resume_elsewhere(torchrun_run, tmp_path):
    source, first = torchrun_run
    assert first.returncode == 0, first.stderr[-3000:]
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)

    # Resume under torchrun, saving every step, and stop it with SIGTERM after step 5.
    process = run_train(workdir, "--resume", "--set", "training.n_steps=60", "--set",
                        "training.snapshot_freq=1", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and max(checkpoint_steps(workdir)) < 5:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    stopped_at = max(checkpoint_steps(workdir))
    assert "resumed from" in output and "at step 3" in output, output[-3000:]
    assert "stopped at step" in output, output[-3000:]
    assert 5 <= stopped_at < 60

    # Resume with one process instead of two.
    resumed = run_train(workdir, "--resume", "--set", f"training.n_steps={stopped_at + 1}",
                        nproc=None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr
    assert "resuming a run of 2 processes with 1" in resumed.stderr
    assert max(checkpoint_steps(workdir)) == stopped_at + 1
    saved = load_checkpoint(workdir / "checkpoints" / f"ckpt_{stopped_at + 1}.pt")
    assert saved["loader"]["world_size"] == 1
    assert saved["loader"]["batch_size"] == 8


def test_trainer_ranks_share_global_noise():
    # Each rank's t and z are its rows of the draw for the global batch, so a checkpoint of the
    # shared generator resumes any number of ranks.
    from qcsbm.trainer import StepSettings, _draw_rank_time_and_noise

    sde = VESDE(sigma_min=0.01, sigma_max=5.0, t_min=1e-5)
    batch = torch.zeros(3, 1, 2, 2)
    single = StepSettings(sde=sde, objective=Objective())
    t_all, noise_all = _draw_rank_time_and_noise(
        single, torch.zeros(6, 1, 2, 2), torch.Generator().manual_seed(0))
    for rank in range(2):
        settings = StepSettings(sde=sde, objective=Objective(), rank=rank, world_size=2)
        t, noise = _draw_rank_time_and_noise(settings, batch, torch.Generator().manual_seed(0))
        rows = slice(3 * rank, 3 * rank + 3)
        torch.testing.assert_close(t, t_all[rows], rtol=0, atol=0)
        torch.testing.assert_close(noise, noise_all[rows], rtol=0, atol=0)
