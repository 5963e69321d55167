"""Crash safety of `qcsbm train`: SIGKILL at random moments, stop signals, non-finite losses.

The kill trials run `qcsbm train` in processes forked from one helper process that has
already imported torch and qcsbm, so a trial costs a fork instead of a Python start. The
helper kills its child with SIGKILL after a seeded random delay, right after a new
checkpoint file appears, or while a temporary checkpoint file exists. A child can also
kill itself with SIGKILL at an exact point of a checkpoint write (half the bytes written,
before the rename, before the pointer update, before pruning). After every kill the test
checks that each checkpoint file loads and that latest.json names a loadable one, then
resumes. Every run folder must end with the same weights, EMA, optimizer, scheduler, data
position and torch random states, bit for bit, as one uninterrupted run.
"""

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcsbm.checkpoints import CHECKPOINT_PATTERN, POINTER_NAME, load_checkpoint
from qcsbm.cli import main
from qcsbm.data.images_loader import ImageLoader

N_STEPS = 30
SNAPSHOT_FREQ = 2
MIN_KILLS = 20

TRAIN_ARGS = ["train", "--config", "digits-qcsbm", "--quiet",
              "--set", "model.nf=8", "--set", "model.ch_mult=1",
              "--set", "model.attn_resolutions=", "--set", "data.batch_size=8",
              "--set", f"training.n_steps={N_STEPS}",
              "--set", f"training.snapshot_freq={SNAPSHOT_FREQ}",
              "--set", "training.log_freq=5"]

# The helper process reads one JSON request per line on stdin, forks a child that runs
# `qcsbm.cli.main(args)` with its output in `log`, applies `stop` to it and writes one JSON
# line with the outcome. Hooks that make the child kill itself are installed after the fork,
# so they never reach the helper or later children.
HELPER = r'''
import contextlib, io, json, logging, os, resource, signal, sys, time, traceback

import sklearn.datasets  # imported once here, so that children do not pay for it
import torch

import qcsbm.checkpoints as checkpoints
import qcsbm.trainer
from qcsbm.cli import main


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def install_hook(phase, nth):
    """Make the child kill itself at `phase` of its checkpoint save number `nth`."""
    saves = [0]
    original_save = checkpoints.CheckpointManager.save

    def counting_save(self, step, state):
        saves[0] += 1
        return original_save(self, step, state)

    checkpoints.CheckpointManager.save = counting_save

    def armed():
        return saves[0] == nth

    if phase == "mid-write":
        original_torch_save = torch.save

        def torch_save(obj, file, *args, **kwargs):
            is_checkpoint = isinstance(obj, dict) and obj.get("format") == checkpoints.CHECKPOINT_FORMAT
            if armed() and is_checkpoint:
                buffer = io.BytesIO()
                original_torch_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                os.fsync(file.fileno())
                kill_self()
            return original_torch_save(obj, file, *args, **kwargs)

        torch.save = torch_save
    elif phase in ("before-rename", "before-pointer"):
        original_replace = os.replace

        def replace(source, target, *args, **kwargs):
            name = os.path.basename(target)
            if phase == "before-rename":
                hit = checkpoints.CHECKPOINT_PATTERN.fullmatch(name) is not None
            else:
                hit = name == checkpoints.POINTER_NAME
            if armed() and hit:
                kill_self()
            return original_replace(source, target, *args, **kwargs)

        os.replace = replace
    elif phase == "before-prune":
        original_prune = checkpoints.CheckpointManager._prune

        def prune(self, newest):
            if armed():
                kill_self()
            return original_prune(self, newest)

        checkpoints.CheckpointManager._prune = prune
    else:
        raise ValueError(f"unknown phase {phase!r}")


def run_child(request):
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.root.handlers.clear()  # main() then logs to the new stderr
    code = 1
    try:
        stop = request["stop"]
        if stop["mode"] == "hook":
            install_hook(stop["phase"], stop["nth"])
        code = main(request["args"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def names(directory, predicate):
    try:
        return {name for name in os.listdir(directory) if predicate(name)}
    except FileNotFoundError:
        return set()


def is_checkpoint(name):
    return checkpoints.CHECKPOINT_PATTERN.fullmatch(name) is not None


def is_temporary(name):
    return name.startswith(".ckpt_") and name.endswith(".tmp")


def supervise(request):
    stop = request["stop"]
    directory = request["checkpoint_dir"]
    known = names(directory, is_checkpoint)
    temporaries = set()
    pid = os.fork()
    if pid == 0:
        run_child(request)
    start = time.monotonic()
    event = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        mode = stop["mode"]
        fire = False
        if mode == "delay":
            fire = time.monotonic() - start >= stop["seconds"]
        elif mode == "new-checkpoint":
            fire = len(names(directory, is_checkpoint) - known) >= stop["nth"]
        elif mode == "temp-file":
            temporaries |= names(directory, is_temporary)
            fire = len(temporaries) >= stop["nth"]
        if fire and event is None:
            event = mode
            os.kill(pid, stop.get("signal", signal.SIGKILL))
            if stop.get("signal", signal.SIGKILL) == signal.SIGKILL:
                _, status = os.waitpid(pid, 0)
                break
        time.sleep(0.0005)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "event": event, "children_cpu_seconds": usage.ru_utime + usage.ru_stime}


# A first training run in this process loads what torch and qcsbm load lazily, so that each
# child starts warm (a cold first run costs seconds of CPU time).
with contextlib.redirect_stderr(io.StringIO()):
    main(json.loads(sys.argv[1]))

for line in sys.stdin:
    print(json.dumps(supervise(json.loads(line))), flush=True)
'''


class TrainHelper:
    """Client of the helper process: runs `qcsbm train` in forked children."""

    def __init__(self, folder: Path):
        script = folder / "train_helper.py"
        script.write_text(HELPER)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        warm_up = ["--log-level", "ERROR", *TRAIN_ARGS, "--workdir", str(folder / "warm-up"),
                   "--set", "training.n_steps=1"]
        self.process = subprocess.Popen([sys.executable, str(script), json.dumps(warm_up)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def run(self, args, workdir: Path, log: Path, stop=None) -> dict:
        request = {"args": args, "log": str(log), "checkpoint_dir": str(workdir / "checkpoints"),
                   "stop": stop or {"mode": "none"}}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the helper process exited with code {self.process.poll()}"
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    client = TrainHelper(tmp_path_factory.mktemp("helper"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(helper, tmp_path_factory):
    """The final checkpoint state of one uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    log = workdir.parent / "train.log"
    outcome = helper.run([*TRAIN_ARGS, "--workdir", str(workdir)], workdir, log)
    assert outcome["exit"] == 0, log.read_text()
    return load_checkpoint(workdir / "checkpoints" / f"ckpt_{N_STEPS}.pt")


# Training neither seeds nor draws from Python's and NumPy's global generators, so their
# saved states depend on the process that started the run, not on the run itself.
UNSEEDED = ("state['rng']['python']", "state['rng']['numpy_legacy']")


def assert_same(saved, expected, where="state"):
    """Assert that two checkpoint states are equal, tensors bit for bit."""
    if where in UNSEEDED:
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(saved, torch.Tensor), where
        assert saved.dtype == expected.dtype, where
        assert torch.equal(saved, expected), where
    elif isinstance(expected, dict):
        assert saved.keys() == expected.keys(), where
        for key in expected:
            assert_same(saved[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(saved) == len(expected), where
        for index, (item, expected_item) in enumerate(zip(saved, expected)):
            assert_same(item, expected_item, f"{where}[{index}]")
    else:
        assert saved == expected, where


def checkpoint_files(workdir: Path) -> list[Path]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if CHECKPOINT_PATTERN.fullmatch(path.name))


def check_after_kill(workdir: Path, trial: int) -> None:
    """Every checkpoint file is complete, and latest.json names one of them."""
    files = checkpoint_files(workdir)
    steps = {}
    for path in files:
        steps[path.name] = load_checkpoint(path)["step"]
        assert path.name == f"ckpt_{steps[path.name]}.pt", f"trial {trial}: {path}"

    pointer = workdir / "checkpoints" / POINTER_NAME
    if pointer.exists():
        data = json.loads(pointer.read_text())
        assert data["checkpoint"] in steps, f"trial {trial}: latest.json names {data}"
        assert steps[data["checkpoint"]] == data["step"], f"trial {trial}"
    else:
        # The pointer is written right after the first checkpoint file.
        assert len(files) <= 1, f"trial {trial}: {len(files)} checkpoints but no latest.json"


def next_args(workdir: Path) -> list[str]:
    if checkpoint_files(workdir):
        return ["train", "--resume", "--workdir", str(workdir), "--quiet"]
    if workdir.exists() and any(workdir.iterdir()):
        return [*TRAIN_ARGS, "--workdir", str(workdir), "--overwrite"]
    return [*TRAIN_ARGS, "--workdir", str(workdir)]


def kill_plan(seed: int):
    """Yield seeded stop requests: random delays, file events and kills inside checkpoint writes."""
    rng = random.Random(seed)
    kinds = ["delay", "mid-write", "new-checkpoint", "before-rename", "delay", "temp-file",
             "before-pointer", "before-prune"]
    for index in itertools.count():
        kind = kinds[index % len(kinds)]
        if kind == "delay":
            yield {"mode": "delay", "seconds": round(rng.uniform(0.2, 3.0), 3)}
        elif kind in ("new-checkpoint", "temp-file"):
            yield {"mode": kind, "nth": rng.randint(1, 3)}
        else:
            yield {"mode": "hook", "phase": kind, "nth": rng.randint(1, 2)}


def test_sigkill_then_resume_matches_uninterrupted(helper, reference, tmp_path):
    plan = kill_plan(seed=20231)
    kills_by_mode = {}
    trial = 0
    folders = 0

    while sum(kills_by_mode.values()) < MIN_KILLS:
        assert trial < 2 * MIN_KILLS, f"only {kills_by_mode} kills in {trial} trials"
        folders += 1
        workdir = tmp_path / f"run{folders}"
        log = tmp_path / f"run{folders}.log"

        # Stop requests until this folder's run finishes, then one run without a stop.
        finished = False
        while not finished and sum(kills_by_mode.values()) < MIN_KILLS:
            stop = next(plan)
            trial += 1
            outcome = helper.run(next_args(workdir), workdir, log, stop)
            if outcome["signal"] == signal.SIGKILL:
                key = stop.get("phase", stop["mode"])
                kills_by_mode[key] = kills_by_mode.get(key, 0) + 1
                check_after_kill(workdir, trial)
                if trial % 4 == 0 and (workdir / "metrics.jsonl").is_file():
                    # A kill in the middle of appending a record leaves a partial line.
                    with (workdir / "metrics.jsonl").open("a") as metrics:
                        metrics.write('{"step": 1, "lo')
            else:
                assert outcome["exit"] == 0, f"trial {trial} {stop}: {log.read_text()}"
                finished = True
        if not finished:
            outcome = helper.run(next_args(workdir), workdir, log)
            assert outcome["exit"] == 0, log.read_text()

        final = load_checkpoint(workdir / "checkpoints" / f"ckpt_{N_STEPS}.pt")
        assert_same(final, reference)
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
        assert records[-1]["step"] == N_STEPS

    kills = sum(kills_by_mode.values())
    print(f"{kills} SIGKILL trials of {trial} in {folders} run folders: {kills_by_mode}; CPU "
          f"time of all training processes so far: {outcome['children_cpu_seconds']:.1f} s")
    # Every kill point inside a checkpoint write was reached at least once.
    for phase in ("mid-write", "before-rename", "before-pointer", "before-prune"):
        assert kills_by_mode.get(phase, 0) >= 1, kills_by_mode


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_then_resume_matches(helper, reference, tmp_path, signum):
    workdir = tmp_path / "run"
    log = tmp_path / "train.log"

    # The signal arrives right after the first checkpoint, in the middle of training.
    stop = {"mode": "new-checkpoint", "nth": 1, "signal": int(signum)}
    outcome = helper.run([*TRAIN_ARGS, "--workdir", str(workdir)], workdir, log, stop)
    stderr = log.read_text()
    assert outcome["exit"] == 75, stderr
    assert f"stopped by {signum.name}" in stderr

    # The checkpoint of the step where training stopped is there and complete.
    pointer = json.loads((workdir / "checkpoints" / POINTER_NAME).read_text())
    assert 1 <= pointer["step"] < N_STEPS
    assert f"at step {pointer['step']};" in stderr
    assert load_checkpoint(workdir / "checkpoints" / pointer["checkpoint"])["step"] == pointer["step"]

    outcome = helper.run(next_args(workdir), workdir, log)
    assert outcome["exit"] == 0, log.read_text()
    assert_same(load_checkpoint(workdir / "checkpoints" / f"ckpt_{N_STEPS}.pt"), reference)


@pytest.fixture
def nan_fourth_batch(monkeypatch):
    """Make the loader's fourth batch of every epoch all NaN."""
    original = ImageLoader.batch

    def batch(self, epoch, batch_index):
        images = original(self, epoch, batch_index)
        return torch.full_like(images, math.nan) if batch_index == 3 else images

    monkeypatch.setattr(ImageLoader, "batch", batch)


def test_nonfinite_loss_exits_3_keeps_checkpoint(tmp_path, capsys, nan_fourth_batch):
    workdir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["--log-level", "ERROR", *TRAIN_ARGS, "--workdir", str(workdir),
                     "--set", "training.n_steps=6"])
    finally:
        torch.set_num_threads(threads)

    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 3, stderr
    assert len(lines) == 1, stderr
    assert "step 4" in lines[0]
    assert "DSM loss" in lines[0]
    assert "noise levels (std)" in lines[0]
    assert "ckpt_2.pt is kept" in lines[0]

    # The checkpoint of step 2 stays, and latest.json still names it.
    names = sorted(path.name for path in checkpoint_files(workdir))
    assert names == ["ckpt_2.pt"]
    pointer = json.loads((workdir / "checkpoints" / POINTER_NAME).read_text())
    assert pointer["checkpoint"] == "ckpt_2.pt"
    assert load_checkpoint(workdir / "checkpoints" / "ckpt_2.pt")["step"] == 2
