"""The evaluation job end to end: shards vs raw text, the compare table, and torchrun data parallelism."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pretrain.data.tokenizer import Tokenizer  # noqa: F401  (the data pipeline must be importable)
    from pretrain.models import build_model, load_model_config
    from pretrain.models.io import export_model
    import torch

    tmp = tmp_path_factory.mktemp("eval")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = []
    for i in range(40):
        text = " ".join(words[(i * 7 + j * j) % len(words)] for j in range(5 + (i * 13) % 60))
        docs.append({"text": text + f" #{i}", "meta": {"pile_set_name": ["Pile-CC", "Github"][i % 2]}})
    lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
    (tmp / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    run = lambda *a: subprocess.run([sys.executable, *a], check=True, cwd=ROOT, capture_output=True, text=True)
    run("data_prep/train_tokenizer.py", "--inputs", str(tmp / "corpus.jsonl.zst"), "--vocab-size", "300",
        "--out", str(tmp / "tok.model"))
    run("data_prep/tokenize_pile.py", "--inputs", str(tmp / "corpus.jsonl.zst"), "--tokenizer",
        str(tmp / "tok.model"), "--out", str(tmp / "data"), "--workers", "1", "--no-progress")
    torch.manual_seed(0)
    cfg = load_model_config(ROOT / "configs/models/tiny_rebased.yaml", ["vocab_size=300", "max_seq_len=64"])
    export_model(build_model(cfg), tmp / "model")
    return tmp


def test_shards_and_raw_text_agree_and_compare_prints(workspace, capsys):
    from pretrain.evaluate import main
    common = ["--checkpoint", str(workspace / "model"), "--tokenizer", str(workspace / "tok.model"),
              "--seq-len", "32", "--batch-size", "4"]
    shards = main(common + ["--data", str(workspace / "data/train"), "--out", str(workspace / "shards.json")])
    raw = main(common + ["--data", str(workspace / "corpus.jsonl.zst"), "--out", str(workspace / "raw.json")])
    assert shards["tokens"] == raw["tokens"] and shards["documents"] == raw["documents"] == 40
    assert shards["nll_sum"] == pytest.approx(raw["nll_sum"], rel=1e-9)
    assert shards["bits_per_byte"] == pytest.approx(raw["bits_per_byte"], rel=1e-9)
    assert set(raw["by_set"]) == {"Pile-CC", "Github"} and not shards["by_set"]
    assert sum(v["tokens"] for v in raw["by_set"].values()) == raw["tokens"]
    capsys.readouterr()
    main(["compare", str(workspace / "shards.json"), str(workspace / "raw.json")])
    out = capsys.readouterr().out
    assert "bits/byte" in out and "Github" in out


@pytest.mark.parametrize("extra", [[], ["--stride", "16", "--documents", "packed"]])
def test_torchrun_data_parallel_equals_single_process(workspace, extra):
    args = ["-m", "pretrain.evaluate", "--checkpoint", str(workspace / "model"), "--data",
            str(workspace / "data/train"), "--tokenizer", str(workspace / "tok.model"), "--seq-len", "32",
            "--batch-size", "3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = workspace / f"single{len(extra)}.json"
    for cmd, out in (([sys.executable, *args], single),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={_free_port()}", *args], workspace / f"parallel{len(extra)}.json")):
        proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    parallel = workspace / f"parallel{len(extra)}.json"
    a, b = json.loads(single.read_text()), json.loads(parallel.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("nll_sum", "tokens", "bytes", "perplexity", "bits_per_byte"):
        assert a[key] == b[key], key  # bit-identical
