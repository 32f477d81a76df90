"""``launch/slurm/local_cluster.sh``: ``up`` on a running cluster keeps it (the same daemons), ``status`` shows its two
nodes (two slurmd daemons on their own ports of this host) idle or busy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .slurm_jobs import CLUSTER

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def cluster(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command], capture_output=True, text=True, timeout=120)


def test_up_is_idempotent_and_status_shows_two_nodes():
    state = Path(os.environ["SLURM_CONF"]).parent
    pids = {f.name: f.read_text() for f in sorted(state.glob("*.pid"))}
    assert sorted(pids) == ["munged.pid", "slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid"]
    p = cluster("up")
    assert p.returncode == 0 and "already up" in p.stdout, p.stdout + p.stderr
    assert {f.name: f.read_text() for f in sorted(state.glob("*.pid"))} == pids, "up restarted a running cluster"
    p = cluster("status")
    assert p.returncode == 0, p.stderr
    nodes = [line.split() for line in p.stdout.splitlines() if line.startswith("n")]
    assert [(n[0], n[-1].rstrip("*") in ("idle", "mixed", "allocated")) for n in nodes] == [("n1", True), ("n2", True)]
