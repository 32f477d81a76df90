"""The shipped run configs start at the world sizes their own headers launch them at: ``launch/pretrain.sh`` on one
node (8 GPUs) and ``sbatch --nodes=N launch/slurm/pretrain.sbatch`` (8 processes per node, the sbatch's default).
The trainer refuses a global batch that is not a multiple of micro batch × world size."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from pretrain.config import load_config
from pretrain.training.config import RunConfig

GPUS_PER_NODE = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", (REPO / "launch/slurm/pretrain.sbatch").read_text())[1])
CONFIGS = sorted((REPO / "configs/runs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_global_batch_fits_the_documented_world_sizes(path):
    cfg = load_config(RunConfig, path)
    text = path.read_text()
    worlds = {1} if cfg.parallel.strategy == "single" else {GPUS_PER_NODE}
    worlds |= {int(n) * GPUS_PER_NODE for n in re.findall(r"sbatch --nodes=(\d+)", text)}
    t = cfg.training
    wrong = [w for w in sorted(worlds) if t.global_batch_size % (t.micro_batch_size * w)]
    assert not wrong, (f"{path.name}: global_batch_size {t.global_batch_size} is no multiple of micro_batch_size "
                       f"{t.micro_batch_size} × world size {wrong}: the trainer refuses to start")
