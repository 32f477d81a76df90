"""``python -m pretrain.training.export`` on a checkpoint written as the trainer writes one (DCP through
``get_state_dict``, meta.json, checksummed COMPLETE): weights per dtype, logits, verification, a crash mid-export,
and output folders it must not replace."""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import ConfigError, from_dict, to_dict
from pretrain.models import ModelConfig, build_model
from pretrain.models.io import WEIGHTS, load_exported
from pretrain.training import checkpoint as ckpt
from pretrain.training.export import export_checkpoint, main

REPO = Path(__file__).resolve().parents[2]


def save_checkpoint(model, root: Path, step: int) -> str:
    """The trainer's save (``Strategy.save`` + ``Trainer.save``) for one process, with optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[2, 3, 4]])).backward()
    optimizer.step()
    tmp = root / ckpt.temp_dir_name(step)
    tmp.mkdir(parents=True)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    ckpt.write_meta(str(tmp), {"step": step, "tokens_seen": 96, "world_size": 1, "strategy": "single",
                               "format": "dcp", "model_config": to_dict(model.config)})
    files = ckpt.checksum_share(str(tmp), ckpt.list_files(str(tmp)))
    return ckpt.commit(str(root), str(tmp), step, files, keep_last=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, dict(vocab_size=64, d_model=32, layers=["short_conv", "rebased"], mlp="swiglu",
                                      mlp_hidden=64, max_seq_len=64, rebased={"num_heads": 2, "feature_dim": 8}))
    model = build_model(cfg)
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    path = save_checkpoint(model, root, 5)
    return model.eval(), root, path


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_exported_weights_and_logits_are_the_checkpoints(trained, tmp_path, dtype):
    model, _, path = trained
    main([path, str(tmp_path / "export"), "--dtype", dtype])
    want = getattr(torch, dtype)
    exported = load_exported(tmp_path / "export", dtype=want)
    for name, value in model.state_dict().items():  # the trained weights, not the initial ones
        assert torch.equal(exported.state_dict()[name], value.to(want)), name
    with torch.no_grad():
        assert torch.equal(exported(IDS), copy.deepcopy(model).to(want)(IDS))
        # loaded without a dtype: float32 computation on the rounded weights
        assert torch.equal(load_exported(tmp_path / "export")(IDS), copy.deepcopy(model).to(want).float()(IDS))


def test_export_of_a_checkpoint_root_takes_its_latest(trained, tmp_path):
    model, root, _ = trained
    main([str(root), str(tmp_path / "export")])
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "export")(IDS), model(IDS))


def test_a_damaged_checkpoint_is_not_exported(trained, tmp_path, capsys):
    _, _, path = trained
    damaged = tmp_path / "step_00000005"
    shutil.copytree(path, damaged)
    shard = next((damaged / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main([str(damaged), str(tmp_path / "export")])
    assert e.value.code == 2
    assert re.search(f"error: .*fails verification.*{re.escape(str(shard))}", capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("what", ["nothing", "export", "file"])
def test_a_path_that_is_no_checkpoint_is_named(trained, tmp_path, what, capsys):
    _, _, path = trained
    bad = tmp_path / what
    if what == "export":
        main([path, str(bad)])
    elif what == "file":
        bad.write_text("x")
    with pytest.raises(SystemExit) as e:
        main([str(bad), str(tmp_path / "out")])
    assert e.value.code == 2 and f"error: no complete checkpoint at {bad}" in capsys.readouterr().err


def test_the_current_folder_as_output_is_refused_not_a_crash(trained, tmp_path, capsys, monkeypatch):
    """``export CKPT .``: the folder itself (here not an export, so it is not replaced); Path('.').with_name crashed."""
    _, _, path = trained
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([path, "."])
    assert e.value.code == 2 and "is not an export" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()


def test_only_an_export_or_an_empty_folder_is_replaced(trained, tmp_path):
    """Exporting into the checkpoint root (or any other folder with contents) would have replaced it: every
    checkpoint gone. A previous export and an empty folder are replaced."""
    _, root, path = trained
    with pytest.raises(ConfigError, match=f"{root}: exists and is not an export"):
        export_checkpoint(path, str(root))
    with pytest.raises(ConfigError, match="not an export"):
        export_checkpoint(path, path)
    assert ckpt.find_latest(str(root)) == path and not ckpt.verify(path)
    (tmp_path / "empty").mkdir()
    export_checkpoint(path, str(tmp_path / "empty"))
    export_checkpoint(path, str(tmp_path / "empty"), dtype="bfloat16")  # now an export: replaced
    assert load_file(tmp_path / "empty" / WEIGHTS)["embed.weight"].dtype == torch.bfloat16


def test_a_crash_mid_export_leaves_the_previous_export(trained, tmp_path):
    _, _, path = trained
    out = tmp_path / "export"
    export_checkpoint(path, str(out), dtype="bfloat16")
    before = (out / WEIGHTS).read_bytes()
    # the process dies with half of the weights written
    code = ("import os, sys, pretrain.models.io as io\n"
            "def crash(state, filename, metadata=None):\n"
            "    open(filename, 'wb').write(b'half'); os._exit(9)\n"
            "io.save_file = crash\n"
            "from pretrain.training.export import main; main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, path, str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 9, p.stderr[-2000:]
    assert (out / WEIGHTS).read_bytes() == before
    assert load_file(out / WEIGHTS)["embed.weight"].dtype == torch.bfloat16


def test_a_failed_export_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import pretrain.models.io as io

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.write_export({"embed.weight": torch.zeros(2, 2)}, {"tie_embeddings": True}, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip_a_weight_byte", "truncate_weights", "edit_config", "bad_yaml",
                                    "missing_config"])
def test_a_damaged_export_is_refused_naming_the_file(trained, tmp_path, damage):
    """export.json records both files' SHA-256: a byte flipped inside the tensor data loaded silently (NaN logits)
    before; torn or unparsable files raised raw safetensors / YAML errors."""
    import json

    from pretrain.models.io import CONFIG, MANIFEST, export_model

    model, _, _ = trained
    out = tmp_path / "export"
    export_model(model, out)
    recorded = json.loads((out / MANIFEST).read_text())["sha256"]
    assert set(recorded) == {WEIGHTS, CONFIG}
    load_exported(out)  # intact: loads
    weights, config = out / WEIGHTS, out / CONFIG
    if damage == "flip_a_weight_byte":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x40
        weights.write_bytes(bytes(data))
        name, message = WEIGHTS, "SHA-256 differs"
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
        name, message = WEIGHTS, "SHA-256 differs"
    elif damage == "edit_config":
        config.write_text(config.read_text().replace("d_model: 32", "d_model: 64"))
        name, message = CONFIG, "SHA-256 differs"
    elif damage == "bad_yaml":
        (out / MANIFEST).unlink()  # an export without checksums still gets a clear parse error
        config.write_text("vocab_size: [1, 2\n: : bad\n")
        name, message = CONFIG, "not a readable YAML model config"
    else:
        config.unlink()
        name, message = CONFIG, "missing"
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    text = str(e.value)
    assert f"{out / name}" in text and message in text and "\n" not in text


@pytest.mark.parametrize("recorded", [[], "x", {WEIGHTS: "0" * 64}, None])
def test_a_malformed_export_manifest_is_refused_by_name(trained, tmp_path, recorded):
    """'sha256' of another shape crashed with an AttributeError; one naming only some files left the others
    unchecked."""
    import json

    from pretrain.models.io import MANIFEST, export_model

    out = tmp_path / "export"
    export_model(trained[0], out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["sha256"] = recorded
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(out / MANIFEST))}: malformed"):
        load_exported(out)


@pytest.mark.parametrize("change", ["unknown_key", "other_shapes", "no_model_config"])
def test_a_checkpoint_whose_model_config_does_not_fit_is_not_exported(trained, tmp_path, change, capsys):
    """A checkpoint of another code version (a model key this code lacks) or with weights another config made: the
    export names the checkpoint's meta.json and writes nothing (it published an export that could not be loaded,
    and the evaluation named a deleted temporary folder)."""
    import json

    _, root, path = trained
    copy_root = tmp_path / "checkpoints"
    shutil.copytree(root, copy_root)
    step = copy_root / Path(path).name
    meta = json.loads((step / "meta.json").read_text())
    if change == "unknown_key":
        meta["model_config"]["rebased"]["old_option"] = 1
    elif change == "other_shapes":
        meta["model_config"]["d_model"] = 48
    else:
        del meta["model_config"]
    ckpt.write_meta(str(step), meta)
    # a checkpoint consistent otherwise: its marker records the new meta.json
    ckpt.write_marker(str(step), meta["step"], ckpt.checksum_share(str(step), ckpt.list_files(str(step))))
    assert ckpt.verify(str(step)) == []
    with pytest.raises(SystemExit) as e:
        main([str(step), str(tmp_path / "export")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and line.startswith("error: ") and str(step / "meta.json") in line
    assert {"unknown_key": "unknown key 'rebased.old_option'", "other_shapes": "shape: ",
            "no_model_config": "no model_config recorded"}[change] in line
    assert not (tmp_path / "export").exists()
