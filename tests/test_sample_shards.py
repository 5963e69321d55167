"""Sharded sampling: blocks, seeds independent of the shard count, the checked merge, resume."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from qcsbm.cli import main
from qcsbm.errors import UsageError
from qcsbm.sample_shards import (block_ranges, load_samples, merge_shards, parse_shard,
                                 save_samples, shard_blocks, shard_path)
from test_cli_sample import PC_FAST, make_run

NUM, BATCH = 5, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: these tiny networks gain nothing from intra-op parallelism."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "digits")


def sample(run_dir, out, *extra, seed=3):
    return main(["sample", "--workdir", str(run_dir), "--out", str(out), "--quiet", *PC_FAST,
                 "--num", str(NUM), "--batch-size", str(BATCH), "--seed", str(seed), *extra])


@pytest.fixture(scope="module")
def unsharded(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "samples.npz"
    assert sample(run_dir, out) == 0
    return load_samples(out)


@pytest.fixture(scope="module")
def two_shards(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "job"
    for index in range(2):
        assert sample(run_dir, folder, "--shard", f"{index}/2") == 0
    return folder


# --- blocks and shards ------------------------------------------------------------------------


def test_shards_cover_every_block_once():
    for num_samples in (1, 5, 17):
        for batch_size in (1, 2, 8):
            num_blocks = len(block_ranges(num_samples, batch_size))
            for count in (1, 2, 3, 7):
                blocks = [b for i in range(count) for b in shard_blocks(num_blocks, i, count)]
                assert blocks == list(range(num_blocks))


def test_block_ranges_cover_samples():
    assert block_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert block_ranges(4, 4) == [(0, 4)]


@pytest.mark.parametrize("text", ["1", "2/2", "-1/2", "a/b", "0/0", ""])
def test_parse_shard_rejects(text):
    with pytest.raises(UsageError, match="invalid --shard"):
        parse_shard(text)


def test_parse_shard_accepts():
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard(" 0 / 1 ") == (0, 1)


# --- same samples with and without shards -----------------------------------------------------


def test_two_shards_match_one_process(two_shards, unsharded):
    merged = merge_shards(two_shards)
    assert merged.indices.tolist() == list(range(NUM))
    assert np.array_equal(merged.images, unsharded.images)
    assert merged.metadata["job"] == unsharded.metadata["job"]
    assert merged.metadata["nfe_mean"] == unsharded.metadata["nfe_mean"]


def test_three_shards_match_one_process(run_dir, unsharded, tmp_path):
    folder = tmp_path / "job"
    for index in range(3):
        assert sample(run_dir, folder, "--shard", f"{index}/3") == 0
    assert np.array_equal(merge_shards(folder).images, unsharded.images)


def test_merge_command_writes_file(two_shards, unsharded, tmp_path):
    out = tmp_path / "merged.npz"
    assert main(["sample", "merge", str(two_shards), "--out", str(out)]) == 0
    merged = load_samples(out)
    assert np.array_equal(merged.images, unsharded.images)
    assert merged.metadata["merged_shards"] == 2
    assert out.with_suffix(".png").is_file()


def test_finished_shard_skipped(run_dir, two_shards):
    path = shard_path(two_shards, 0, 2)
    before = path.stat().st_mtime_ns
    assert sample(run_dir, two_shards, "--shard", "0/2") == 0
    assert path.stat().st_mtime_ns == before


# --- a merge that must fail -------------------------------------------------------------------


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def test_merge_missing_shard(two_shards, tmp_path, capsys):
    folder = copy_folder(two_shards, tmp_path / "job")
    shard_path(folder, 1, 2).unlink()
    assert main(["sample", "merge", str(folder)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "missing 1 of 2 shards (1/2)" in error[0]


def test_merge_copied_shard(two_shards, tmp_path):
    folder = copy_folder(two_shards, tmp_path / "job")
    shutil.copy(shard_path(folder, 0, 2), shard_path(folder, 1, 2))
    with pytest.raises(UsageError, match="contains shard .* not 1/2"):
        merge_shards(folder)


def test_merge_duplicated_samples(two_shards, tmp_path):
    folder = copy_folder(two_shards, tmp_path / "job")
    first = load_samples(shard_path(folder, 0, 2))
    second = load_samples(shard_path(folder, 1, 2))
    second.images = np.concatenate([second.images, first.images[:1]])
    second.indices = np.concatenate([second.indices, first.indices[:1]])
    save_samples(shard_path(folder, 1, 2), second)
    with pytest.raises(UsageError, match="duplicate sample index 0 in shard files"):
        merge_shards(folder)


def test_merge_foreign_shard_count(two_shards, tmp_path):
    folder = copy_folder(two_shards, tmp_path / "job")
    shutil.copy(shard_path(folder, 0, 2), shard_path(folder, 0, 3))
    with pytest.raises(UsageError, match="does not belong to the 2 shards"):
        merge_shards(folder)


def test_shard_of_other_job_rejected(run_dir, two_shards, tmp_path, capsys):
    folder = copy_folder(two_shards, tmp_path / "job")
    shard_path(folder, 1, 2).unlink()
    assert sample(run_dir, folder, "--shard", "1/2", seed=4) == 2
    assert "seed is 3 there and 4 in this run" in capsys.readouterr().err
    assert not shard_path(folder, 1, 2).exists()


def test_single_shard_file_rejected_as_samples(two_shards):
    from qcsbm.sample_shards import read_samples

    with pytest.raises(UsageError, match="holds shard 0/2 only"):
        read_samples(shard_path(two_shards, 0, 2))


# --- torchrun -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes(run_dir, unsharded, tmp_path):
    folder = tmp_path / "job"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "qcsbm",
                    "sample", "--workdir", str(run_dir), "--out", str(folder), "--quiet",
                    *PC_FAST, "--num-samples", str(NUM), "--batch-size", str(BATCH),
                    "--seed", "3"],
                   check=True, capture_output=True, env=environment, timeout=600)
    merged = load_samples(folder / "samples.npz")
    assert np.array_equal(merged.images, unsharded.images)
    assert merged.metadata["merged_shards"] == 2
