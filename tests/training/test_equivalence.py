"""Same data and seed: single vs ddp vs fsdp vs DeepSpeed ZeRO-1/2/3 give the same 20 losses.

Tolerance: relative 2e-6 on the loss (and 5e-3 on the gradient norm, see below). All runs are fp32 on CPU and compute the
same sums, but in a different order: one process accumulates 4 micro batches, two processes accumulate 2 each and
then average over gloo; ZeRO reduces flat bucketed buffers and clips with a multiply instead of a divide. Each
reordering changes the last bit (fp32 ε = 1.2e-7) and Adam carries that forward, so bitwise equality is not
expected; we observe ≤ 1e-7 relative after 20 steps. 2e-6 keeps a ~25× margin over that noise while staying far
below any real divergence: a learning rate only 1% larger already moves the losses by ~1.5e-4 relative (checked
below), and a missing gradient average, a wrong accumulation factor or one skipped sample move them far more.
Step 4 has a NaN injected in every run: all strategies must skip that update the same way.
The gradient norm is far more sensitive than the loss at some steps: at step 11 of this trajectory every strategy's
norm differs from single's by 0.01-0.19% (1.9285-1.9335 against 1.9298) while the losses agree to 1e-7, so its
tolerance is 5e-3; a missing gradient average or a wrong accumulation factor moves it by tens of percent.
"""

import pytest

from conftest import REFERENCE_RUNS, REPO, STEPS, losses, max_rel_diff, records, run

LOSS_RTOL = 2e-6
GRAD_RTOL = 5e-3


@pytest.mark.parametrize("key", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_strategy_matches_single(runs, key):
    ref = losses(runs.reference("single"))
    got = losses(runs.reference(key))
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    assert [got[s]["batch_fp"] for s in got] == [ref[s]["batch_fp"] for s in got], "different samples"
    assert got[4]["loss"] == "nan" and got[4]["skipped_steps"] == 1, "the injected NaN step must be skipped"
    assert max_rel_diff(got, ref, "loss") <= LOSS_RTOL
    assert max_rel_diff(got, ref, "grad_norm") <= GRAD_RTOL
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.1, "the loss must fall"


def test_tolerance_catches_a_real_divergence(runs, shards, tmp_path):
    """The tolerance is tight enough: a 1% larger learning rate fails it by a wide margin."""
    ref = losses(runs.reference("single"))
    out = tmp_path / "lr_plus_1pct"
    run(shards, out, 1, "single", ["optim.lr=0.00303", "checkpoint.every=0", "checkpoint.save_final=false"])
    assert max_rel_diff(losses(out), ref) > 20 * LOSS_RTOL


@pytest.mark.parametrize("key,chunk", [("single", 0), ("single", 24), ("fsdp", 24), ("zero3", 24)])
def test_loss_chunking_changes_nothing(runs, shards, key, chunk):
    """training.loss_chunk_tokens: the reference runs use the default (8192 tokens, more than a micro batch's 64:
    one chunk); 0 is the full logits and F.cross_entropy, 24 three chunks (24, 24, 16), also under FSDP2 and ZeRO-3,
    whose forward hooks must gather the LM head (tied to the embedding) for the loss. The same losses and gradient
    norms as the reference, within the tolerance across strategies. The single runs also evaluate (the validation
    loss is a chunked sum too): both agree to fp32 rounding."""
    nproc, strategy, overrides = REFERENCE_RUNS[key]
    ref = losses(runs.reference(key))
    evaluate = {"data.valid": [{"path": str(shards / "valid")}], "training.eval_every": 10} if key == "single" else {}
    out = runs.get(f"{key}_loss_chunk_{chunk}", nproc, strategy, [*overrides, f"training.loss_chunk_tokens={chunk}"],
                   **evaluate)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max_rel_diff(got, ref, "loss") <= LOSS_RTOL
    assert max_rel_diff(got, ref, "grad_norm") <= GRAD_RTOL
    if key == "single":
        val = {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}
        assert sorted(val) == [10, 20]
        other_chunk = 24 if chunk == 0 else 0
        other = runs.get(f"single_loss_chunk_{other_chunk}", 1, "single",
                         [f"training.loss_chunk_tokens={other_chunk}"], **evaluate)
        other_val = {r["step"]: r["val_loss"] for r in records(other) if "val_loss" in r}
        assert all(abs(val[s] - other_val[s]) <= 1e-6 * val[s] for s in val), (val, other_val)


# The trainer, writing at exit how many graphs dynamo compiled, one file per worker (their stdout interleaves); a
# script, as torchrun starts
COUNTING_COMPILED_GRAPHS = (
    "import atexit, os, sys\n"
    "import torch._dynamo.utils as dynamo_utils\n"
    "def report():\n"
    "    path = os.path.join(os.environ['GRAPHS_OUT'], 'rank' + os.environ.get('RANK', '0'))\n"
    "    with open(path, 'w') as f:\n"
    "        f.write(str(dynamo_utils.counters['stats']['unique_graphs']))\n"
    "atexit.register(report)\n"
    "from pretrain.train import main\n"
    "sys.exit(main(sys.argv[1:]))\n")
COMPILE_RTOL = 1e-5


@pytest.mark.parametrize("key", ["fsdp", "zero2"])
def test_compile_matches_eager(runs, shards, tmp_path, key):
    """training.compile (every block through torch.compile) in the real trainer under FSDP2 with full activation
    checkpointing and under ZeRO-2 with selective checkpointing (one process is the same code without the
    wrappers; left out for CI time): the same samples and the eager run's
    losses and gradient norms. Inductor fuses and reorders fp32 sums, so the losses agree to about 1e-6, not
    bitwise (1e-5 allowed; a 1% larger learning rate moves them by 1.5e-4). The workers report the graphs dynamo
    compiled, so a compile that silently did not happen fails. CPU only: the GPU trainer's compiled speed is
    issue 21's measurement."""
    nproc, strategy, _ = REFERENCE_RUNS[key]
    ref = losses(runs.reference(key))
    out = tmp_path / f"{key}_compiled"
    script = tmp_path / "train_counting_compiled_graphs.py"
    script.write_text(COUNTING_COMPILED_GRAPHS)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    run(shards, out, nproc, strategy, [*runs.overrides(key), "training.compile=true"], timeout=600,
        entry=(str(script),), extra_env={"PYTHONPATH": str(REPO), "GRAPHS_OUT": str(graphs)})
    compiled = {p.name: int(p.read_text()) for p in graphs.iterdir()}
    assert sorted(compiled) == [f"rank{r}" for r in range(nproc)] and all(n > 0 for n in compiled.values()), compiled
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["batch_fp"] for s in got] == [ref[s]["batch_fp"] for s in got], "different samples"
    assert got[4]["loss"] == "nan" and got[4]["skipped_steps"] == 1
    assert max_rel_diff(got, ref, "loss") <= COMPILE_RTOL
    # the gradient norm: within 1e-4 at every step but the one hypersensitive step of this trajectory (11, see the
    # module docstring), where eager strategies differ by up to 0.19% and compiled runs measured 0.5-0.8%
    norm_diffs = sorted(max_rel_diff({s: got[s]}, ref, "grad_norm") for s in got)
    assert norm_diffs[-2] <= 1e-4 and norm_diffs[-1] <= 2e-2, norm_diffs[-3:]
