"""A checkpoint is verified before it is trusted (CPU, gloo; the tiny runs of conftest: 20 steps, checkpoints every 5,
keep_last 2, so a finished run keeps step 15 and step 20).

* ``COMPLETE`` lists every file of the checkpoint with its size and xxh3-64 hash (model/optimizer files of every
  strategy, DCP ``.metadata``, DeepSpeed files, RNG states, meta.json); ``verify`` reports a truncated, zeroed,
  garbled or missing file, and a damaged or checksum-less marker, naming the file.
* ``resume: auto`` passes over checkpoints that fail verification to the newest one that verifies, moves the bad ones
  aside (``step_N.corrupt``) and says so in one line; the resumed run then ends with the uninterrupted run's losses.
  When none verifies it refuses (exit 2, one message naming each checkpoint and its problem) and moves nothing.
* Every path of the run config is checked before anything starts, and all problems are reported at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REFERENCE_RUNS, REPO, STEPS, assert_same_losses, base_config, env, losses, run
from pretrain.training import checkpoint as ckpt


def _overwrite(path, offset: int, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(len(data))
        f.seek(offset)
        f.write(data)
    assert before != data, "the damage must change the bytes"


def _largest(root, pattern: str):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if pattern in f]
    return max(files, key=os.path.getsize)


def damage(checkpoint: str, kind: str) -> str:
    """Damage one file of ``checkpoint`` the way a failing disk or a bad copy would; returns the file."""
    if kind == "tensor_bytes_zeroed":  # inside the largest stored tensor data: the middle of the biggest weights file
        f = _largest(checkpoint, ".distcp")
        _overwrite(f, os.path.getsize(f) // 2, b"\0" * 64)
    elif kind == "tensor_bytes_garbled":
        f = _largest(checkpoint, ".distcp")
        _overwrite(f, os.path.getsize(f) // 2, b"\x7f" * 16)
    elif kind == "weights_truncated":
        f = _largest(checkpoint, ".distcp")
        os.truncate(f, os.path.getsize(f) // 2)
    elif kind == "dcp_metadata_missing":
        f = os.path.join(checkpoint, "dcp", ".metadata")
        os.remove(f)
    elif kind == "meta_json_truncated":
        f = os.path.join(checkpoint, "meta.json")
        os.truncate(f, os.path.getsize(f) - 10)
    elif kind == "rng_garbled":
        f = os.path.join(checkpoint, "rng", "rank_00000.pt")
        _overwrite(f, os.path.getsize(f) - 200, b"\x7f" * 8)
    elif kind == "deepspeed_optimizer_truncated":
        f = _largest(checkpoint, "optim_states.pt")
        os.truncate(f, os.path.getsize(f) - 1000)
    elif kind == "marker_truncated":
        f = os.path.join(checkpoint, ckpt.COMPLETE)
        os.truncate(f, os.path.getsize(f) // 2)
    elif kind == "marker_without_checksums":  # as written before checksums were recorded
        f = os.path.join(checkpoint, ckpt.COMPLETE)
        with open(f, "w") as fh:
            fh.write("20\n")
    else:
        raise AssertionError(kind)
    return f


def copy_checkpoints(src_run, out):
    """A new run directory holding a copy of ``src_run``'s checkpoints (the copy is what the test damages)."""
    shutil.copytree(src_run / "checkpoints", out / "checkpoints")
    return out / "checkpoints"


DCP_DAMAGE = ["tensor_bytes_zeroed", "tensor_bytes_garbled", "weights_truncated", "dcp_metadata_missing",
              "meta_json_truncated", "rng_garbled", "marker_truncated", "marker_without_checksums"]


@pytest.mark.parametrize("kind", DCP_DAMAGE)
def test_verify_names_the_damaged_file(runs, tmp_path, kind):
    root = copy_checkpoints(runs.reference("single"), tmp_path)
    good, bad = str(root / "step_00000015"), str(root / "step_00000020")
    assert ckpt.verify(good) == [] and ckpt.verify(bad) == []
    f = damage(bad, kind)
    problems = ckpt.verify(bad)
    assert problems and f in problems[0], problems
    # every rank checks its own share of the files; together they find the same problem
    assert sorted(set(sum((ckpt.verify(bad, r, 3) for r in range(3)), []))) == sorted(problems)
    assert ckpt.verify(good) == []


def test_every_strategys_files_are_listed(runs):
    """The marker covers the model/optimizer files of DCP (single, FSDP2) and DeepSpeed, the RNG state of every rank
    and meta.json: nothing a resume reads is left out."""
    for key in ("single", "fsdp", "zero2"):
        path = str(runs.reference(key) / "checkpoints" / "step_00000020")
        listed = set(ckpt.read_marker(path))
        assert listed == set(ckpt.list_files(path)), key
        nproc = REFERENCE_RUNS[key][0]
        assert {"meta.json", *(f"rng/rank_{r:05d}.pt" for r in range(nproc))} <= listed
        if key == "zero2":
            assert any(f.endswith("model_states.pt") for f in listed)
            assert sum(f.endswith("optim_states.pt") for f in listed) == nproc
        else:
            assert "dcp/.metadata" in listed and any(f.endswith(".distcp") for f in listed)


@pytest.mark.parametrize("key,kind", [("single", "tensor_bytes_zeroed"), ("fsdp", "dcp_metadata_missing"),
                                      ("zero2", "deepspeed_optimizer_truncated")])
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(runs, shards, tmp_path, key, kind):
    nproc, strategy, _ = REFERENCE_RUNS[key]
    ref = losses(runs.reference(key))
    out = tmp_path / "run"
    root = copy_checkpoints(runs.reference(key), out)
    f = damage(str(root / "step_00000020"), kind)
    p = run(shards, out, nproc, strategy, runs.overrides(key))
    notes = [line for line in p.stderr.splitlines() if "failed verification" in line]
    assert len(notes) == 1, p.stderr[-3000:]
    assert (f"1 newer checkpoint(s) failed verification, moved aside as .corrupt (step_00000020: {f}" in notes[0]
            and notes[0].endswith(f"resuming from the newest that verifies, {root / 'step_00000015'}")), notes[0]
    assert f"resumed from {root / 'step_00000015'} (step 15" in p.stderr
    assert (root / "step_00000020.corrupt").is_dir(), "the damaged checkpoint is kept aside for inspection"
    assert ckpt.verify(str(root / "step_00000020")) == [], "the rerun saved step 20 again"
    got = losses(out)
    assert sorted(got) == list(range(16, STEPS + 1))
    assert_same_losses({**{s: ref[s] for s in range(1, 16)}, **got}, ref, f"{key} after falling back")


def test_resume_refuses_when_no_checkpoint_verifies(runs, shards, tmp_path):
    out = tmp_path / "run"
    root = copy_checkpoints(runs.reference("single"), out)
    damage(str(root / "step_00000015"), "rng_garbled")
    damage(str(root / "step_00000020"), "tensor_bytes_zeroed")
    p = run(shards, out, 1, "single", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    msg = [line for line in p.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert len(msg) == 1 and f"no checkpoint in {root} passes verification, refusing to resume" in msg[0], p.stderr
    assert "step_00000020: " in msg[0] and "step_00000015: " in msg[0] and "Traceback" not in p.stderr
    assert sorted(os.listdir(root)) == ["latest", "step_00000015", "step_00000020"], "nothing is moved or removed"
    assert losses(out) == {}

    # a checkpoint named explicitly is used only if it verifies
    p = run(shards, out, 1, "single", [f"checkpoint.resume={root / 'step_00000015'}"], check=False)
    assert p.returncode == 2 and "fails verification: " in p.stderr and "rank_00000.pt" in p.stderr, p.stderr


def test_damaged_universal_checkpoint_is_converted_again(runs, tmp_path, monkeypatch):
    """A DeepSpeed universal checkpoint (made for a world-size change and kept next to the native files) carries
    its own checksums; one that fails them is rebuilt from the verified native files, not loaded."""
    from pretrain.training.parallel import DeepSpeedStrategy

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    src = runs.reference("zero2") / "checkpoints" / "step_00000015"
    path = tmp_path / "step_00000015"
    shutil.copytree(src, path)
    universal = path / "deepspeed" / "universal"
    DeepSpeedStrategy.convert_to_universal(str(path))
    assert ckpt.verify(str(universal), required=()) == []
    f = _largest(universal, ".pt")
    _overwrite(f, os.path.getsize(f) - 100, b"\0" * 8)
    assert ckpt.verify(str(universal), required=())
    DeepSpeedStrategy.convert_to_universal(str(path))
    assert ckpt.verify(str(universal), required=()) == []


def test_every_bad_path_is_reported_before_anything_starts(shards, tmp_path):
    """Missing train and validation data, a missing DeepSpeed JSON and a missing model config: one message lists all
    four, exit 2, within seconds, before any process group, model or output exists."""
    out = tmp_path / "run"
    cfg = base_config(shards, out)
    cfg["model"] = str(tmp_path / "no_model.yaml")
    cfg["data"]["train"].append({"path": str(tmp_path / "no_train"), "weight": 1.0})
    cfg["data"]["valid"] = [{"path": str(shards / "valid")}, {"path": str(tmp_path / "no_valid")}]
    cfg["parallel"] = {"strategy": "deepspeed", "deepspeed_config": str(tmp_path / "no_ds.json")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(path)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert time.time() - t0 < 60
    assert p.stderr.startswith(f"config error: {path}: 4 problem(s) with paths:"), p.stderr
    for expected in ("model: ", f"data.train[2].path: no indexed dataset (.idx/.bin) found at '{tmp_path / 'no_train'}'",
                     f"data.valid[1].path: no indexed dataset (.idx/.bin) found at '{tmp_path / 'no_valid'}'",
                     f"parallel.deepspeed_config: cannot read '{tmp_path / 'no_ds.json'}'"):
        assert f"\n  {expected}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


def test_evaluation_refuses_a_damaged_checkpoint_in_one_line(runs, shards, tmp_path, capsys):
    """``python -m pretrain.evaluate`` on a checkpoint that fails verification: exit 2, one line naming the file."""
    from pretrain.evaluate import main as evaluate_main

    root = copy_checkpoints(runs.reference("single"), tmp_path)
    f = damage(str(root / "step_00000020"), "tensor_bytes_zeroed")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(root / "step_00000020"), "--data", str(shards / "valid"),
                       "--eod-id", "0", "--seq-len", "32", "--max-documents", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f in err[0], err


def test_a_start_after_a_crash_mid_resave_or_mid_rotation_restores_or_removes_the_leftovers(runs, tmp_path):
    """A save of a step that exists sets the old one aside (step_N.old-PID) and renames the new one in: a crash
    between the two renames left no step_N (the new copy, a temp dir, was deleted at the next start). The rotation
    renames a checkpoint before deleting it, so a crash mid-delete leaves no half checkpoint under a step's name."""
    root = tmp_path / "checkpoints"
    shutil.copytree(runs.reference("single") / "checkpoints", root)
    (step15, path15), (step20, path20) = ckpt.list_complete(str(root))
    os.rename(path20, f"{path20}.old-123")  # the crash: set aside, the new save still a temp dir
    shutil.copytree(f"{path20}.old-123", root / ckpt.temp_dir_name(step20))
    shutil.copytree(path15, f"{path15}.old-456")  # set aside while the new one landed: an outdated copy
    shutil.copytree(path15, f"{path15}.deleting-789")
    os.remove(f"{path15}.deleting-789/meta.json")  # a rotation's delete cut short
    ckpt.remove_stale_temps(str(root))
    assert sorted(os.listdir(root)) == ["latest", "step_00000015", "step_00000020"]
    assert ckpt.verify(path20) == [] and ckpt.find_latest(str(root)) == path20


def test_rotation_deletes_under_another_name(tmp_path, monkeypatch):
    """What the rotation's rmtree sees is no longer a checkpoint's name."""
    deleted = []
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda path, **kw: deleted.append(os.path.basename(path)))
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        tmp = root / ckpt.temp_dir_name(step)
        tmp.mkdir(parents=True)
        ckpt.write_meta(str(tmp), {"step": step})
        ckpt.commit(str(root), str(tmp), step, ckpt.checksum_share(str(tmp), ckpt.list_files(str(tmp))), keep_last=1)
    assert len(deleted) == 1 and deleted[0].startswith("step_00000005.deleting-")
    assert [s for s, _ in ckpt.list_complete(str(root))] == [10]
