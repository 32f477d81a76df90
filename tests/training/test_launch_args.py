"""What ``launch/pretrain.sh`` hands to its launcher, without training: stand-ins for ``python -m pretrain.train`` /
``-m pretrain.torchrun``, ``deepspeed`` and ``nvidia-smi`` record the command the script would run (any other python
call, such as the script's own config check, runs the real interpreter).

* the config path may be relative to the caller's directory and hold spaces; overrides with spaces and quotes pass
  through unchanged;
* the process count follows CUDA_VISIBLE_DEVICES, not every GPU nvidia-smi lists;
* DeepSpeed on one node goes through ``pretrain.torchrun`` (message once, signals forwarded); the deepspeed
  launcher, when asked for, keeps CUDA_VISIBLE_DEVICES;
* several nodes without MASTER_ADDR stop with a clear message before any launcher starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PYTHON_STANDIN = """#!/usr/bin/env bash
if [ "${1:-}" = -m ] && { [ "${2:-}" = pretrain.train ] || [ "${2:-}" = pretrain.torchrun ]; }; then
  printf '%s\\0' python "$@" > "$LAUNCH_RECORD"; printf '%s' "${WANDB_MODE-<unset>}" > "$LAUNCH_RECORD.wandb"; exit 0
fi
exec REAL_PYTHON "$@"
"""
DEEPSPEED_STANDIN = """#!/usr/bin/env bash
printf '%s\\0' deepspeed "$@" > "$LAUNCH_RECORD"
"""
NVIDIA_SMI_STANDIN = """#!/usr/bin/env bash
for ((i = 0; i < FAKE_GPUS; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


@pytest.fixture
def launch(tmp_path):
    """Runs launch/pretrain.sh with the stand-ins; returns (completed process, recorded command or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", PYTHON_STANDIN.replace("REAL_PYTHON", sys.executable)),
                       ("deepspeed", DEEPSPEED_STANDIN), ("nvidia-smi", NVIDIA_SMI_STANDIN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "launched"

    def run(args, cwd=REPO, gpus=0, **env_vars):
        record.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("CUDA_VISIBLE_DEVICES", "LAUNCHER", "NPROC_PER_NODE", "NNODES", "MASTER_ADDR",
                            "MASTER_PORT", "HOSTFILE", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(REBASED_SKIP_INSTALL="1", LAUNCH_RECORD=str(record), FAKE_GPUS=str(gpus),
                   PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", **env_vars)
        p = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), *args], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120)
        return p, (record.read_text().split("\0")[:-1] if record.exists() else None)

    return run


def write_config(path: Path, strategy: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"model: configs/models/tiny_rebased.yaml\nparallel: {{strategy: {strategy}}}\n")
    return path


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_config_relative_to_the_callers_directory_with_spaces(launch, tmp_path):
    config = write_config(tmp_path / "my runs" / "run 1.yaml", "single")
    overrides = ["name=a run with spaces", "logging.wandb.name='it''s \"quoted\"'"]
    p, command = launch(["my runs/run 1.yaml", *overrides], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert command == ["python", "-m", "pretrain.train", "--config", str(config), *overrides]


@pytest.mark.parametrize("visible, nproc", [("1,3", "2"), ("", "1"), (None, "4")])
def test_process_count_follows_cuda_visible_devices(launch, tmp_path, visible, nproc):
    config = write_config(tmp_path / "run.yaml", "ddp")
    extra = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    p, command = launch([str(config)], gpus=4, **extra)
    assert p.returncode == 0, p.stderr[-3000:]
    assert command[:3] == ["python", "-m", "pretrain.torchrun"] and option(command, "--nproc_per_node") == nproc


def test_deepspeed_on_one_node_runs_under_pretrain_torchrun(launch, tmp_path):
    config = write_config(tmp_path / "run.yaml", "deepspeed")
    p, command = launch([str(config)], gpus=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert command[:3] == ["python", "-m", "pretrain.torchrun"] and option(command, "--nproc_per_node") == "2"

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    p, command = launch([str(config)], gpus=2, HOSTFILE=str(hostfile), MASTER_ADDR="node1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert command[0] == "deepspeed" and option(command, "--hostfile") == str(hostfile), command


def test_a_relative_hostfile_is_the_callers_and_a_missing_one_stops_the_launch(launch, tmp_path):
    """The script runs from the repository root: a HOSTFILE relative to the caller's directory was not found there,
    and DeepSpeed silently ran on this node alone."""
    config = write_config(tmp_path / "run.yaml", "deepspeed")
    (tmp_path / "hosts").write_text("node1 slots=2\nnode2 slots=2\n")
    p, command = launch([str(config)], cwd=tmp_path, gpus=2, HOSTFILE="hosts", MASTER_ADDR="node1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert option(command, "--hostfile") == str(tmp_path / "hosts"), command
    p, command = launch([str(config)], cwd=tmp_path, gpus=2, HOSTFILE="no-such-hosts")
    assert p.returncode == 2 and command is None and f"HOSTFILE={tmp_path}/no-such-hosts: no such file" in p.stderr


def test_deepspeed_on_several_nodes_needs_a_hostfile(launch, tmp_path):
    """NNODES=2 with LAUNCHER=deepspeed and no HOSTFILE ran on one node (NNODES and MASTER_ADDR dropped)."""
    config = write_config(tmp_path / "run.yaml", "deepspeed")
    p, command = launch([str(config)], gpus=2, LAUNCHER="deepspeed", NNODES="2", MASTER_ADDR="node1")
    assert p.returncode == 2 and command is None and "needs HOSTFILE" in p.stderr


def test_deepspeed_launcher_keeps_cuda_visible_devices(launch, tmp_path):
    """With --num_gpus DeepSpeed ignores CUDA_VISIBLE_DEVICES and runs on GPUs 0..N-1, someone else's GPUs."""
    config = write_config(tmp_path / "run.yaml", "deepspeed")
    p, command = launch([str(config)], gpus=4, LAUNCHER="deepspeed", CUDA_VISIBLE_DEVICES="2,3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert command[0] == "deepspeed" and "--num_gpus" not in command, command


def test_several_nodes_need_master_addr(launch, tmp_path):
    config = write_config(tmp_path / "run.yaml", "ddp")
    p, command = launch([str(config)], NNODES="2", NODE_RANK="1")
    assert p.returncode == 2 and command is None, p.stderr[-3000:]
    assert "NNODES=2: set MASTER_ADDR" in p.stderr


@pytest.mark.parametrize("variable, value", [("NPROC_PER_NODE", "0"), ("NPROC_PER_NODE", "abc"),
                                             ("NPROC_PER_NODE", "-2"), ("NNODES", "two")])
def test_process_counts_that_are_not_whole_numbers_stop_the_launch(launch, tmp_path, variable, value):
    """0 reached torchrun as an AssertionError traceback; "abc" was read by bash arithmetic as an unset variable."""
    config = write_config(tmp_path / "run.yaml", "ddp")
    p, command = launch([str(config)], **{variable: value})
    assert p.returncode == 2 and command is None
    assert f"{variable}={value}: expected a whole number >= 1" in p.stderr


EVAL_SBATCH_PYTHON = """#!/usr/bin/env bash
if [ "${1:-}" = -m ] && [ "${2:-}" = pretrain.torchrun ]; then printf '%s\\0' python "$@" > "$LAUNCH_RECORD"; exit 0; fi
exec REAL_PYTHON "$@"
"""


@pytest.mark.parametrize("visible, expected", [(None, "8"), ("0,1", "2"), ("3", "1")])
def test_eval_sbatch_starts_one_process_per_visible_gpu_through_our_launcher(tmp_path, visible, expected):
    """eval.sbatch counted every GPU nvidia-smi lists (8 processes on a job given 2 GPUs of a node without device
    cgroups) and ran plain torchrun (exit 1 and its dump for a bad checkpoint, where pretrain.torchrun keeps 2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", EVAL_SBATCH_PYTHON.replace("REAL_PYTHON", sys.executable)),
                       ("nvidia-smi", NVIDIA_SMI_STANDIN), ("srun", '#!/usr/bin/env bash\nshift\nexec "$@"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "launched"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(REBASED_SKIP_INSTALL="1", LAUNCH_RECORD=str(record), FAKE_GPUS="8", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_ID="7", PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    had_results = (REPO / "results").exists()  # the job makes results/ in the submit folder
    try:
        p = subprocess.run(["bash", str(REPO / "launch/slurm/eval.sbatch"), "runs/x/export", "data/val", "--out",
                            str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    finally:
        if not had_results and (REPO / "results").is_dir() and not any((REPO / "results").iterdir()):
            (REPO / "results").rmdir()
    assert p.returncode == 0, p.stderr[-2000:]
    command = record.read_text().split("\0")[:-1]
    assert command[:3] == ["python", "-m", "pretrain.torchrun"]
    assert option(command, "--nproc_per_node") is None and f"--nproc_per_node={expected}" in command


@pytest.mark.parametrize("wandb_mode", [None, "disabled", "online"])
def test_the_configs_wandb_mode_holds_unless_the_environment_sets_one(launch, tmp_path, monkeypatch, wandb_mode):
    """The launcher exported WANDB_MODE=offline when it was unset, and the trainer lets the environment win: a
    config's `logging.wandb.mode: disabled` (or online) was never what ran through launch/pretrain.sh."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    p, cmd = launch(["configs/runs/tiny_cpu.yaml"], **({} if wandb_mode is None else {"WANDB_MODE": wandb_mode}))
    assert p.returncode == 0 and cmd is not None, p.stderr
    assert (tmp_path / "launched.wandb").read_text() == (wandb_mode or "<unset>")
