"""Submitting and watching jobs on the local Slurm cluster (``launch/slurm/local_cluster.sh``), and the tiny
training runs the Slurm tests compare: the tiny ReBased hybrid, seq_len 32, global batch 8, 20 steps, fp32 on CPU
with gloo, 2 processes, checkpoints every 5 steps, metrics every step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch/slurm/local_cluster.sh"
STEPS = 20
# CPU nodes: no GPUs, one CPU per process (the sbatch headers ask for 8 GPUs and 12 CPUs per task)
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")


def job_env(**extra) -> dict:
    """What a job inherits from sbatch: this interpreter's environment as it is (no install in the job),
    W&B off, one thread per process."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               REBASED_SKIP_INSTALL="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def slurm(*args: str, env=None) -> str:
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


class Job:
    def __init__(self, job_id: str, log: Path | None):
        self.id, self.log_path = job_id, log

    @classmethod
    def submit(cls, script: str, args=(), *, log: Path | None, options=(), env=None) -> "Job":
        """``sbatch`` from the repository root (where the sbatch scripts run), the job's output in ``log`` (None:
        where the script says)."""
        output = [f"--output={log}"] if log else []
        out = slurm("sbatch", "--parsable", *output, *options, script, *map(str, args), env=env)
        return cls(out.strip().split(";")[0], log)

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as key -> value (values without spaces; for an array, its first task)."""
        line = slurm("scontrol", "show", "job", "-o", self.id).splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def wait(self, states: set[str], timeout: float = 240, **expect: str) -> dict[str, str]:
        """Until the job is in one of ``states`` with the ``expect``ed fields (e.g. Restarts="1")."""
        t0 = time.monotonic()
        while True:
            info = self.info()
            if info["JobState"] in states and all(info.get(k) == v for k, v in expect.items()):
                return info
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"job {self.id} not {states} {expect} after {timeout:.0f} s: "
                                     f"{info.get('JobState')} {info.get('Reason')} Restarts={info.get('Restarts')}\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.3)

    def wait_array(self, timeout: float = 240) -> list[str]:
        """Until no task of this array job is left in the queue; the state of each task, in task order."""
        t0 = time.monotonic()
        while slurm("squeue", "-h", "-j", self.id).strip():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"array job {self.id} still queued after {timeout:.0f} s")
            time.sleep(0.5)
        lines = slurm("scontrol", "show", "job", "-o", self.id).splitlines()
        tasks = sorted((int(re.search(r"ArrayTaskId=(\d+)", x)[1]), re.search(r"JobState=(\S+)", x)[1]) for x in lines)
        return [state for _, state in tasks]

    def steps(self) -> list[str]:
        """Its running job steps other than the batch script (e.g. ``42.0``)."""
        return [s for s in slurm("squeue", "-h", "-s", "-j", self.id, "-o", "%i").split()
                if not s.endswith((".batch", ".extern"))]

    def cancel(self):
        subprocess.run(["scancel", self.id], capture_output=True)


# --- tiny training runs ------------------------------------------------------------------------------------------
def write_run_config(path: Path, shards: Path, out_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "model": str(REPO / "configs/models/tiny_rebased.yaml"),
        "out_dir": str(out_dir),
        "data": {"train": [{"path": str(shards / "train"), "weight": 1.0}], "seq_len": 32},
        "training": {"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "seed": 7},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "cosine"},
        "parallel": {"strategy": "ddp"},
        "checkpoint": {"every": 5, "keep_last": 2},
        "logging": {"every": 1, "progress_bar": False},
    }))
    return path


def losses(out_dir: Path) -> dict[int, tuple]:
    """(loss, batch fingerprint) per step; a resumed run appends, the later record of a step wins."""
    f = out_dir / "metrics.jsonl"
    out = {}
    for line in (f.read_text().splitlines() if f.exists() else []):
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["batch_fp"])
    return out


def assert_same_losses(got: dict, ref: dict, context: str):
    assert sorted(got) == list(range(1, STEPS + 1)), f"{context}: steps {sorted(got)}"
    differ = [s for s in got if got[s] != ref[s]]
    assert not differ, f"{context}: steps {differ} differ from the uninterrupted run"


def wait_for_step(out_dir: Path, step: int, job: Job, timeout: float = 240) -> int:
    t0 = last_check = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = max(losses(out_dir), default=0)
        if got >= step:
            return got
        if time.monotonic() - last_check > 1:
            last_check = time.monotonic()
            if job.info()["JobState"] not in ("PENDING", "RUNNING"):
                break
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached: {job.info().get('JobState')}\n{job.log()[-4000:]}")
