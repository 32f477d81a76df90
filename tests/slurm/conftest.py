"""The Slurm tests' fixtures: the local cluster (brought up for the session when it is not up already, and taken
down again), the synthetic shards and the uninterrupted reference run every Slurm run is compared with.

Where the cluster cannot start (not root, no Slurm packages) the tests skip with the reason; in CI (CI=true) that
is a failure instead, so that CI never passes without having run them."""

from __future__ import annotations

import os
import subprocess

import pytest

from pretrain.data.synthetic import write_synthetic_shard
from .slurm_jobs import CLUSTER, REPO, job_env, losses, write_run_config


@pytest.fixture(scope="session")
def slurm_cluster():
    p = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        reason = f"the local Slurm cluster cannot start: {(p.stderr.strip() or p.stdout.strip()).splitlines()[-1]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must run the Slurm tests: .ci/run installs the packages and runs as root)")
        pytest.skip(reason)
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    os.environ["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    yield
    if "already up" not in p.stdout:  # we started it: leave the machine as we found it
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_shards")
    write_synthetic_shard(str(root / "train"), 60_000, 1024, seed=0)
    write_synthetic_shard(str(root / "valid"), 8_000, 1024, seed=2)
    return root


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory):
    """The uninterrupted run, outside Slurm (launch/pretrain.sh, 2 processes), with its export for eval.sbatch."""
    root = tmp_path_factory.mktemp("slurm_reference")
    out = root / "run"
    config = write_run_config(root / "run.yaml", shards, out)
    p = subprocess.run(["bash", "launch/pretrain.sh", str(config), "checkpoint.export_final=true"], cwd=REPO,
                       env=job_env(NPROC_PER_NODE=2, LAUNCHER="torchrun"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return out, losses(out)
