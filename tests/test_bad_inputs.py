"""Bad input to every `qcsbm` command: exit code 2, one line on stderr, no file changed.

Each row of `CASES` is one bad input. The test runs the command in this process and sends
log records to stderr at the default INFO level, as the command line does. It compares every
file under the test's folder and under the shared inputs (names, sizes, mtimes and SHA-256
hashes) before and after.
"""

import hashlib
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qcsbm.checkpoints import load_checkpoint, save_checkpoint
from qcsbm.cli import main
from qcsbm.config import apply_overrides
from qcsbm.models import build_score_model
from qcsbm.presets import preset_config
from qcsbm.trainer import train

TINY = ["model.nf=8", "model.ch_mult=1", "model.attn_resolutions=", "data.batch_size=8",
        "training.log_freq=1"]
TINY_ARGS = [arg for override in TINY for arg in ("--set", override)]

SCORE_SDE_FIXTURE = (Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
                     / "ncsnpp" / "tiny" / "checkpoint.pth")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shared inputs: a trained run, damaged checkpoints and bad data files."""
    root = tmp_path_factory.mktemp("inputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = apply_overrides(preset_config("digits-usbm"),
                              TINY + ["training.n_steps=2", "training.snapshot_freq=2"])
        train(cfg, root / "run", progress=False, device="cpu")

        # The same run whose checkpoint contains the weights of a wider network (nf 16).
        other = root / "run-other-architecture"
        shutil.copytree(root / "run", other)
        state = load_checkpoint(other / "checkpoints" / "ckpt_2.pt")
        wide, _ = build_score_model(apply_overrides(cfg, ["model.nf=16"]))
        state["model"] = wide.net.state_dict()
        state["ema"]["state_dict"] = wide.net.state_dict()
        save_checkpoint(other / "checkpoints" / "ckpt_2.pt", state)
    finally:
        torch.set_num_threads(threads)

    checkpoint = root / "run" / "checkpoints" / "ckpt_2.pt"
    data = checkpoint.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    truncated_run = root / "run-truncated"
    shutil.copytree(root / "run", truncated_run)
    (truncated_run / "checkpoints" / "ckpt_2.pt").write_bytes(data[: len(data) // 3])
    (root / "not-a-checkpoint.pt").write_text("not a checkpoint\n")

    # Data files: NaN values, a wrong shape, a corrupt PNG.
    levels = np.random.default_rng(0).integers(0, 256, size=(16, 8, 8, 1)).astype(np.float32)
    levels[3, 2, 2, 0] = np.nan
    np.savez(root / "nan.npz", images=levels)
    np.savez(root / "wrong-shape.npz", images=np.zeros((16, 8, 8, 2), dtype=np.uint8))
    np.savez(root / "wrong-size.npz", images=np.zeros((16, 16, 16, 1), dtype=np.uint8))
    corrupt = root / "corrupt-images"
    corrupt.mkdir()
    (corrupt / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "bad.json").write_text('{"training": {"n_steps": 3,}')
    (root / "unknown-key.json").write_text('{"training": {"lamda_qc": 0.1}}')
    (root / "study-out").mkdir()
    (root / "study-out" / "notes.txt").write_text("someone's file\n")
    return SimpleNamespace(root=root, run=root / "run", other=other, checkpoint=checkpoint,
                           truncated=root / "truncated.pt", truncated_run=truncated_run,
                           garbage=root / "not-a-checkpoint.pt", nan=root / "nan.npz",
                           wrong_shape=root / "wrong-shape.npz",
                           wrong_size=root / "wrong-size.npz", corrupt=corrupt,
                           bad_json=root / "bad.json", unknown_key=root / "unknown-key.json",
                           study_out=root / "study-out")


def train_args(tmp, *extra, config="digits-qcsbm"):
    return ["train", "--config", config, "--workdir", str(tmp / "new-run"), "--quiet",
            *TINY_ARGS, *extra]


def study(name, tmp, *extra):
    return ["study", name, "--preset", "quick", "--out", str(tmp / "study"), "--quiet", *extra]


def sample(workdir, *extra):
    return ["sample", "--workdir", str(workdir), "--sampler", "pc", "--num", "2", "--steps",
            "2", "--quiet", "--device", "cpu", *extra]


def evaluate(metric, workdir, *extra):
    return ["eval", metric, "--workdir", str(workdir), "--quiet", *extra]


def import_args(path, tmp, *extra):
    return ["import-checkpoint", str(path), "--out", str(tmp / "imported"),
            "--config", "digits-usbm", *TINY_ARGS, *extra]


# (case id, argv from (inputs, tmp_path), text the error line must contain)
CASES = [
    # --- study toy2d
    ("toy2d negative lambda", lambda i, t: study("toy2d", t, "--lambda-qc", "-1"), "-1"),
    ("toy2d zero probes", lambda i, t: study("toy2d", t, "--estimator", "hutchinson",
                                             "--num-probes", "0"), "0"),
    ("toy2d sigma_min >= sigma_max", lambda i, t: study("toy2d", t, "--sigma-min", "3",
                                                        "--sigma-max", "1"), "sigma"),
    ("toy2d unknown dataset", lambda i, t: study("toy2d", t, "--dataset", "moons"), "moons"),
    ("toy2d unknown model", lambda i, t: study("toy2d", t, "--models", "usbm,gan"), "gan"),
    ("toy2d unknown estimator", lambda i, t: study("toy2d", t, "--estimator", "exactly"),
     "exactly"),
    ("toy2d wrong type steps", lambda i, t: study("toy2d", t, "--steps", "ten"), "ten"),
    ("toy2d zero steps", lambda i, t: study("toy2d", t, "--steps", "0"), "0"),
    ("toy2d negative lr", lambda i, t: study("toy2d", t, "--lr", "-0.1"), "-0.1"),
    ("toy2d absent gpu", lambda i, t: study("toy2d", t, "--device", "cuda:99"), "cuda:99"),
    ("toy2d cpu index", lambda i, t: study("toy2d", t, "--device", "cpu:1"), "cpu:1"),
    ("toy2d huge lr", lambda i, t: study("toy2d", t, "--lr", "1e300"), "1e+300"),
    ("toy2d bad seeds", lambda i, t: study("toy2d", t, "--seeds", "0,x"), "x"),
    ("toy2d unknown preset", lambda i, t: study("toy2d", t, "--preset", "fast"), "fast"),
    ("toy2d non-empty output", lambda i, t: ["study", "toy2d", "--preset", "quick", "--out",
                                             str(i.study_out), "--quiet"], "study-out"),
    # --- study gaussian
    ("gaussian negative sigma", lambda i, t: study("gaussian", t, "--sigma", "-0.1"), "-0.1"),
    ("gaussian bad eps", lambda i, t: study("gaussian", t, "--eps", "0,abc"), "abc"),
    ("gaussian negative eps", lambda i, t: study("gaussian", t, "--eps", "0,-1e-3"), "-0.001"),
    ("gaussian zero chains", lambda i, t: study("gaussian", t, "--chains", "0"), "0"),
    ("gaussian zero steps", lambda i, t: study("gaussian", t, "--steps", "0"), "0"),
    ("gaussian negative step size", lambda i, t: study("gaussian", t, "--step-size", "-1"),
     "-1"),
    ("gaussian negative start std", lambda i, t: study("gaussian", t, "--start-std", "-0.5"),
     "-0.5"),
    ("gaussian nan sigma", lambda i, t: study("gaussian", t, "--sigma", "nan"), "nan"),
    ("gaussian infinite sigma", lambda i, t: study("gaussian", t, "--sigma", "inf"), "inf"),
    ("gaussian nan start mean", lambda i, t: study("gaussian", t, "--start-mean", "nan"),
     "--start-mean nan"),
    ("gaussian non-empty output", lambda i, t: ["study", "gaussian", "--preset", "quick",
                                                "--out", str(i.study_out), "--quiet"],
     "study-out"),
    # --- study autoencoder
    ("autoencoder zero hidden", lambda i, t: study("autoencoder", t, "--hidden", "0"), "0"),
    ("autoencoder grid of one", lambda i, t: study("autoencoder", t, "--grid-size", "1"), "1"),
    ("autoencoder negative steps", lambda i, t: study("autoencoder", t, "--steps", "-5"), "-5"),
    ("autoencoder zero lr", lambda i, t: study("autoencoder", t, "--lr", "0"), "0"),
    ("autoencoder bad seeds", lambda i, t: study("autoencoder", t, "--seeds", "a"), "a"),
    ("autoencoder non-empty output", lambda i, t: ["study", "autoencoder", "--preset", "quick",
                                                   "--out", str(i.study_out), "--quiet"],
     "study-out"),
    # --- train: options and configuration
    ("train negative lambda", lambda i, t: train_args(t, "--set", "training.lambda_qc=-1"),
     "training.lambda_qc"),
    ("train zero probes", lambda i, t: train_args(t, "--set", "training.num_probes=0"),
     "training.num_probes"),
    ("train sigma_min >= sigma_max", lambda i, t: train_args(t, "--set", "sde.sigma_min=20"),
     "sigma_min"),
    ("train sigma_min == sigma_max", lambda i, t: train_args(t, "--set", "sde.sigma_min=10"),
     "sigma_min"),
    ("train t_min zero", lambda i, t: train_args(t, "--set", "sde.t_min=0"), "t_min"),
    ("train t_min one", lambda i, t: train_args(t, "--set", "sde.t_min=1"), "t_min"),
    ("train t_min above one", lambda i, t: train_args(t, "--set", "sde.t_min=1.5"), "t_min"),
    ("train unknown key", lambda i, t: train_args(t, "--set", "training.nsteps=3"),
     "did you mean 'training.n_steps'"),
    ("train unknown section", lambda i, t: train_args(t, "--set", "trainig.n_steps=3"),
     "trainig"),
    ("train wrong type int", lambda i, t: train_args(t, "--set", "training.n_steps=abc"),
     "abc"),
    ("train wrong type float", lambda i, t: train_args(t, "--set", "data.batch_size=2.5"),
     "2.5"),
    ("train wrong type bool", lambda i, t: train_args(t, "--set", "data.random_flip=maybe"),
     "maybe"),
    ("train bad choice", lambda i, t: train_args(t, "--set", "training.estimator=exactly"),
     "exactly"),
    ("train set without equals", lambda i, t: train_args(t, "--set", "training.n_steps"),
     "training.n_steps"),
    ("train zero batch", lambda i, t: train_args(t, "--set", "data.batch_size=0"),
     "data.batch_size"),
    ("train zero steps", lambda i, t: train_args(t, "--set", "training.n_steps=0"),
     "training.n_steps"),
    ("train negative lr", lambda i, t: train_args(t, "--set", "optim.lr=-1e-3"), "optim.lr"),
    ("train nan lr", lambda i, t: train_args(t, "--set", "optim.lr=nan"), "optim.lr"),
    ("train ema rate one", lambda i, t: train_args(t, "--set", "optim.ema_rate=1.5"),
     "optim.ema_rate"),
    ("train unknown preset", lambda i, t: train_args(t, config="digits-qcsb"),
     "did you mean 'digits-qcsbm'"),
    ("train missing config file", lambda i, t: train_args(t, config=str(t / "missing.json")),
     "missing.json"),
    ("train invalid json", lambda i, t: train_args(t, config=str(i.bad_json)), "bad.json"),
    ("train unknown key in file", lambda i, t: train_args(t, config=str(i.unknown_key)),
     "did you mean 'training.lambda_qc'"),
    ("train missing workdir", lambda i, t: ["train", "--config", "digits-qcsbm"],
     "--workdir"),
    ("train missing config", lambda i, t: ["train", "--workdir", str(t / "new-run")],
     "--config"),
    ("train unknown device", lambda i, t: train_args(t, "--device", "tpu"), "tpu"),
    ("train huge lr", lambda i, t: train_args(t, "--set", "optim.lr=1e300"), "optim.lr"),
    ("train resume and overwrite", lambda i, t: train_args(t, "--resume", "--overwrite"),
     "--resume"),
    ("train init-optimizer alone", lambda i, t: train_args(t, "--init-optimizer"),
     "--init-from"),
    # --- train: data
    ("train npz with NaN", lambda i, t: train_args(t, "--set", "data.dataset=npz",
                                                   "--set", f"data.path={i.nan}"), "NaN"),
    ("train npz wrong shape", lambda i, t: train_args(t, "--set", "data.dataset=npz",
                                                      "--set", f"data.path={i.wrong_shape}"),
     "wrong-shape.npz"),
    ("train npz wrong image size", lambda i, t: train_args(
        t, "--set", "data.dataset=npz", "--set", f"data.path={i.wrong_size}"), "16x16"),
    ("train missing npz", lambda i, t: train_args(t, "--set", "data.dataset=npz",
                                                  "--set", f"data.path={t / 'none.npz'}"),
     "none.npz"),
    ("train corrupt image", lambda i, t: train_args(t, "--set", "data.dataset=folder",
                                                    "--set", f"data.path={i.corrupt}"),
     "0.png"),
    ("train missing image folder", lambda i, t: train_args(
        t, "--set", "data.dataset=folder", "--set", f"data.path={t / 'no-images'}"),
     "no-images"),
    ("train unknown dataset", lambda i, t: train_args(t, "--set", "data.dataset=mnist"),
     "mnist"),
    # --- train: run folders and checkpoints
    ("train existing run folder", lambda i, t: ["train", "--config", "digits-usbm",
                                                "--workdir", str(i.run), "--quiet", *TINY_ARGS],
     "--resume"),
    ("train resume missing folder", lambda i, t: ["train", "--resume", "--workdir",
                                                  str(t / "none")], "none"),
    ("train resume changes model", lambda i, t: ["train", "--resume", "--workdir", str(i.run),
                                                 "--set", "model.nf=16", "--quiet"],
     "model.nf"),
    ("train resume truncated", lambda i, t: ["train", "--resume", "--workdir",
                                             str(i.truncated_run), "--quiet"], "truncated"),
    ("train resume other architecture", lambda i, t: ["train", "--resume", "--workdir",
                                                      str(i.other), "--quiet"],
     "does not match"),
    ("train init-from missing", lambda i, t: train_args(t, "--init-from",
                                                        str(t / "none.pth")), "none.pth"),
    ("train init-from truncated", lambda i, t: train_args(t, "--init-from", str(i.truncated)),
     "truncated.pt"),
    ("train init-from garbage", lambda i, t: train_args(t, "--init-from", str(i.garbage)),
     "not-a-checkpoint.pt"),
    ("train init-from other architecture", lambda i, t: train_args(
        t, "--init-from", str(i.checkpoint), "--set", "model.nf=16"), "does not match"),
    ("train resume with init-from", lambda i, t: ["train", "--resume", "--workdir",
                                                  str(i.run), "--init-from", str(i.checkpoint)],
     "--init-from"),
    # --- sample
    ("sample missing workdir", lambda i, t: sample(t / "none"), "none"),
    ("sample absent gpu", lambda i, t: sample(i.run, "--device", "cuda:99"), "cuda:99"),
    ("sample not a run", lambda i, t: sample(i.corrupt), "corrupt-images"),
    ("sample truncated checkpoint", lambda i, t: sample(i.truncated_run), "truncated"),
    ("sample other architecture", lambda i, t: sample(i.other), "does not match"),
    ("sample missing step", lambda i, t: sample(i.run, "--checkpoint-step", "7"), "7"),
    ("sample zero samples", lambda i, t: sample(i.run, "--num", "0"), "0"),
    ("sample zero batch", lambda i, t: sample(i.run, "--batch-size", "0"), "0"),
    ("sample zero steps", lambda i, t: sample(i.run, "--steps", "0"), "0"),
    ("sample negative snr", lambda i, t: sample(i.run, "--snr", "-0.1"), "-0.1"),
    ("sample bad shard", lambda i, t: sample(i.run, "--shard", "3/2", "--out",
                                             str(t / "shards")), "3/2"),
    ("sample bad sampler", lambda i, t: ["sample", "--workdir", str(i.run), "--sampler",
                                         "ddim"], "ddim"),
    ("sample negative rtol", lambda i, t: ["sample", "--workdir", str(i.run), "--sampler",
                                           "ode", "--num", "2", "--rtol=-1", "--quiet"], "-1"),
    ("sample merge missing folder", lambda i, t: ["sample", "merge", str(t / "none")], "none"),
    # --- eval nll
    ("eval nll missing workdir", lambda i, t: evaluate("nll", t / "none"), "none"),
    ("eval nll absent gpu", lambda i, t: evaluate("nll", i.run, "--device", "cuda:99"),
     "cuda:99"),
    ("eval nll truncated", lambda i, t: evaluate("nll", i.truncated_run, "--num", "2"),
     "truncated"),
    ("eval nll other architecture", lambda i, t: evaluate("nll", i.other, "--num", "2"),
     "does not match"),
    ("eval nll zero images", lambda i, t: evaluate("nll", i.run, "--num", "0"), "0"),
    ("eval nll zero probes", lambda i, t: evaluate("nll", i.run, "--num-probes", "0"), "0"),
    ("eval nll negative rtol", lambda i, t: evaluate("nll", i.run, "--rtol=-1e-5"),
     "-1e-05"),
    ("eval nll data path for digits", lambda i, t: evaluate(
        "nll", i.run, "--data-path", str(i.nan), "--num", "2"), "nan.npz"),
    # --- eval asym
    ("eval asym missing workdir", lambda i, t: evaluate("asym", t / "none"), "none"),
    ("eval asym truncated", lambda i, t: evaluate("asym", i.truncated_run), "truncated"),
    ("eval asym other architecture", lambda i, t: evaluate("asym", i.other), "does not match"),
    ("eval asym zero levels", lambda i, t: evaluate("asym", i.run, "--num-levels", "0"), "0"),
    ("eval asym zero probes", lambda i, t: evaluate("asym", i.run, "--num-probes", "0"), "0"),
    ("eval asym zero images", lambda i, t: evaluate("asym", i.run, "--num", "0"), "0"),
    # --- eval quality
    ("eval quality missing workdir", lambda i, t: evaluate("quality", t / "none"), "none"),
    ("eval quality missing samples", lambda i, t: evaluate(
        "quality", i.run, "--samples", str(t / "none.npz")), "none.npz"),
    ("eval quality zero k", lambda i, t: evaluate("quality", i.run, "--nearest-k", "0"), "0"),
    ("eval quality missing ref stats", lambda i, t: evaluate(
        "quality", i.run, "--ref-stats", str(t / "stats.npz")), "stats.npz"),
    # --- import-checkpoint
    ("import missing file", lambda i, t: import_args(t / "none.pth", t), "none.pth"),
    ("import truncated", lambda i, t: import_args(i.truncated, t), "truncated.pt"),
    ("import garbage", lambda i, t: import_args(i.garbage, t), "not-a-checkpoint.pt"),
    ("import qcsbm checkpoint", lambda i, t: import_args(i.checkpoint, t), "ckpt_2.pt"),
    ("import unknown preset", lambda i, t: ["import-checkpoint", str(i.checkpoint), "--out",
                                            str(t / "imported"), "--config", "digits-usb"],
     "digits-usb"),
    ("import unknown key", lambda i, t: import_args(i.checkpoint, t, "--set",
                                                    "model.nff=8"), "model.nff"),
    ("import existing run folder", lambda i, t: ["import-checkpoint", str(SCORE_SDE_FIXTURE),
                                                 "--out", str(i.run)], "run"),
    ("import other architecture", lambda i, t: ["import-checkpoint", str(SCORE_SDE_FIXTURE),
                                                "--out", str(t / "imported"), "--config",
                                                "digits-usbm"], "does not match"),
]


# Cases that still print more than the error line, or report another problem first. Each
# reason names the fix; a strict xfail turns into a failure once the fix lands.
KNOWN_BUGS = {}


def case_params():
    params = []
    for case in CASES:
        marks = ()
        if case[0] in KNOWN_BUGS:
            marks = pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case[0]])
        params.append(pytest.param(*case, id=case[0], marks=marks))
    return params


def snapshot(root: Path) -> dict:
    """Map every path under `root` to (size, mtime in ns, SHA-256), folders to None."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_dir():
            found[relative] = None
        else:
            stat = path.stat()
            found[relative] = (stat.st_size, stat.st_mtime_ns,
                               hashlib.sha256(path.read_bytes()).hexdigest())
    return found


class CurrentStderr:
    """A stream that writes to the current sys.stderr, which pytest's capture replaces."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture
def stderr_logging():
    """Send log records to stderr at INFO, as `qcsbm` does outside pytest."""
    root = logging.getLogger()
    handler = logging.StreamHandler(CurrentStderr())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(level)


def run_main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse errors
        return exit_.code


@pytest.mark.parametrize("case, make_argv, expected", case_params())
def test_bad_input(inputs, tmp_path, capsys, monkeypatch, stderr_logging, case, make_argv,
                   expected):
    # An empty torch hub cache, so that no test finds Inception weights by chance.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path.parent / f"{tmp_path.name}-torch-home"))
    if "import" in case and SCORE_SDE_FIXTURE.name in " ".join(make_argv(inputs, tmp_path)) \
            and not SCORE_SDE_FIXTURE.is_file():
        pytest.skip(f"score_sde_pytorch fixture not found at {SCORE_SDE_FIXTURE}")
    argv = make_argv(inputs, tmp_path)
    before = snapshot(inputs.root), snapshot(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run_main(argv)
    finally:
        torch.set_num_threads(threads)

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qcsbm"), captured.err
    assert "error" in lines[0], captured.err
    assert expected in lines[0], captured.err
    assert snapshot(inputs.root) == before[0]
    assert snapshot(tmp_path) == before[1]


def test_every_command_has_cases():
    placeholders = SimpleNamespace(**{name: Path(name) for name in (
        "root", "run", "other", "checkpoint", "truncated", "truncated_run", "garbage", "nan",
        "wrong_shape", "wrong_size", "corrupt", "bad_json", "unknown_key", "study_out")})
    commands = {" ".join(make_argv(placeholders, Path("tmp"))[:2]) for _, make_argv, _ in CASES}

    for command in ("study toy2d", "study gaussian", "study autoencoder", "eval nll",
                    "eval asym", "eval quality"):
        assert command in commands
    first_words = {command.split()[0] for command in commands}
    for command in ("train", "sample", "import-checkpoint"):
        assert command in first_words
