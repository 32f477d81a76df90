"""Edge cases of the parallel strategies and their metrics:

* a non-finite mean loss skips the update on every rank under every strategy, also when only one rank's loss is
  non-finite and when that loss has finite gradients (every label ignored: DeepSpeed's engine, which skips only on
  non-finite gradients, used to apply that update); under FSDP2 an inf in one rank's gradient shard alone skips
  everywhere (a per-shard check would let the ranks diverge) (worker: nonfinite_skip_worker);
* at world size 2 the metrics count the global tokens and MFU uses pretrain/models/flops.py's count over all
  devices, written by rank 0 only;
* the MFU peak is looked up by the whole GPU model number ("L4" is not an "L40S").
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, env, free_port, records, run
from pretrain.models import flops_per_token, load_model_config
from pretrain.training.metrics import peak_flops


@pytest.mark.parametrize("strategy,zero_stage", [("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2),
                                                 ("deepspeed", 3)], ids=["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_nonfinite_loss_skips_the_update_on_every_rank(tmp_path, ds_config, strategy, zero_stage):
    result_path = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(REPO / "tests/training/nonfinite_skip_worker.py"), strategy,
           str(zero_stage), ds_config, str(result_path)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    result = json.loads(result_path.read_text())
    expected_cases = ["ignored_labels", "nan_loss_one_rank"] + (["inf_in_one_shard"] if strategy == "fsdp" else [])
    assert list(result) == [*expected_cases, "finite"]
    for case in expected_cases:
        for rank, out in enumerate(result[case]):
            assert not out["applied"] and not out["state_moved"], f"{case}: rank {rank} updated: {out}"
        assert len({out["norm_finite"] for out in result[case]}) == 1, f"{case}: the ranks disagree: {result[case]}"
    assert all(out["applied"] and out["state_moved"] for out in result["finite"]), result["finite"]


def test_metrics_count_global_tokens_and_only_rank_0_writes(shards, tmp_path):
    out = tmp_path / "run"
    steps, global_batch, seq_len = 3, 8, 32
    p = run(shards, out, 2, "ddp", [f"training.max_steps={steps}", "checkpoint.every=0",
                                    "checkpoint.save_final=false", "training.inject_nan_at_steps=[]"],
            extra_env={"PEAK_TFLOPS": "1"})
    train = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1)), "one metrics line per step (rank 0 only)"
    assert p.stdout.count("step=1 ") == 1 and p.stdout.count("strategy=ddp world=2") == 1, p.stdout
    fpt = flops_per_token(load_model_config(str(REPO / "configs/models/tiny_rebased.yaml")), seq_len)["train"]
    for r in train:
        assert r["tokens_seen"] == r["step"] * global_batch * seq_len
        assert r["tokens_per_s_per_device"] * 2 == pytest.approx(r["tokens_per_s"], rel=1e-12)
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / (1e12 * 2), rel=1e-9)


@pytest.mark.parametrize("name,tflops", [("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA L40", None),
                                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 125.0),
                                         ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0)])
def test_peak_flops_matches_the_whole_model_number(monkeypatch, name, tflops):
    monkeypatch.delenv("PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = peak_flops(torch.device("cuda", 0))
    assert got == (tflops * 1e12 if tflops else None)


# Under torchrun: the trainer's init, then each rank draws a dropout mask from the global RNG as embedding dropout
# would, and writes it with a checksum of its initial weights.
DRAW_AFTER_INIT = """
import json, os, sys
import torch, torch.nn.functional as F
import pretrain.train as train

def record(self):
    mask = F.dropout(torch.ones(256), 0.5, training=True).ne(0).int().tolist()
    weights = float(sum(p.detach().double().sum() for p in self.strategy.module.parameters()))
    with open(os.environ["DRAW_OUT"] + f".rank{self.rank}.json", "w") as f:
        json.dump({"mask": mask, "weights": weights}, f)
    return 0

train.Trainer.run = record
sys.exit(train.main(sys.argv[1:]))
"""


def test_data_parallel_ranks_draw_different_dropout_masks_from_the_same_init(shards, tmp_path):
    """Same seed → the same initial weights on every rank, but each rank its own random stream afterwards (with one
    stream, every rank would drop the same embedding positions); the same seed again gives the same masks."""
    script = tmp_path / "draw_after_init.py"  # torchrun starts a script, not ``-c``
    script.write_text(DRAW_AFTER_INIT)
    draws = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        run(shards, out, 2, "ddp", ["checkpoint.every=0"], entry=(str(script),),
            extra_env={"DRAW_OUT": str(tmp_path / f"draw{attempt}")})
        draws.append([json.loads((tmp_path / f"draw{attempt}.rank{r}.json").read_text()) for r in range(2)])
    for ranks in draws:
        assert ranks[0]["weights"] == ranks[1]["weights"], "every rank must start from the same weights"
        assert ranks[0]["mask"] != ranks[1]["mask"], "the ranks drew the same dropout mask"
    assert draws[0] == draws[1], "the same seed must give the same weights and masks"


def test_config_error_found_after_the_process_group_started_exits_cleanly(shards, tmp_path):
    """A config problem the trainer can only see once it knows the world size (fewer validation sequences than
    processes) is reported with the trainer's config exit code, not as a crash (torchrun stops the other rank
    once one has exited, so that one may be ended by SIGTERM before it reports)."""
    p = run(shards, tmp_path / "run", 2, "ddp", ["training.eval_samples=1", "checkpoint.every=0"], check=False,
            **{"data.valid": [{"path": str(shards / "valid"), "weight": 1.0}]})
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("config error: training.eval_samples=1")]
    assert 1 <= len(errors) <= 2, p.stderr[-3000:]
    assert "failed (exitcode: 2)" in p.stderr, p.stderr[-3000:]  # torchrun's report of the first rank that ended
    assert "terminate called" not in p.stderr and "core dumped" not in p.stderr, p.stderr[-3000:]
