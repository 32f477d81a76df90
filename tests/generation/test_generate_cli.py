"""``python -m pretrain.generate``: streamed single prompts, batches from a file, stop strings, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models import build_model, load_model_config
    from pretrain.models.io import export_model

    tmp = tmp_path_factory.mktemp("generate")
    words = "the cat sat on a mat and then it ran far away from home to see the sea".split()
    lines = [json.dumps({"text": " ".join(words[(i * 5 + j) % len(words)] for j in range(12))}) for i in range(60)]
    (tmp / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "data_prep/train_tokenizer.py", "--inputs", str(tmp / "corpus.jsonl"),
                    "--vocab-size", "300", "--out", str(tmp / "tok.model")], check=True, cwd=ROOT,
                   capture_output=True)
    tokenizer = Tokenizer(tmp / "tok.model")
    torch.manual_seed(0)
    cfg = load_model_config(ROOT / "configs/models/tiny_rebased.yaml", [f"vocab_size={tokenizer.vocab_size}"])
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # decisive logits: greedy is far from ties
    export_model(model, tmp / "model")
    cfg = load_model_config(ROOT / "configs/models/tiny_rebased.yaml",
                            [f"vocab_size={tokenizer.vocab_size}", "learned_positions=true", "max_seq_len=16"])
    export_model(build_model(cfg), tmp / "learned16")  # 16 learned positions
    return tmp, tokenizer


def run(workspace, *args, model="model"):
    tmp, _ = workspace
    return subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(tmp / model),
                           "--tokenizer", str(tmp / "tok.model"), *args], cwd=ROOT, capture_output=True, text=True)


def greedy_text(workspace, prompt: str, new: int) -> str:
    from pretrain.generation.decoder import generate
    from pretrain.models.io import load_exported

    tmp, tok = workspace
    model = load_exported(tmp / "model", device="cpu")
    tokens = generate(model, [[tok.eod_id] + tok.encode(prompt)], new, eos_ids=(tok.eod_id,))[0]
    return tok.decode(tokens[:-1] if tokens and tokens[-1] == tok.eod_id else tokens)


def test_one_prompt_streams_the_greedy_continuation(workspace):
    proc = run(workspace, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the cat" + greedy_text(workspace, "the cat", 12) + "\n"
    assert "1 prompt(s)" in proc.stderr and "fp32, cpu" in proc.stderr


def test_a_file_of_prompts_runs_as_one_batch(workspace, tmp_path):
    prompts = ["the sea", "a mat and", "far"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "samples.jsonl"
    proc = run(workspace, "--prompts", str(tmp_path / "p.txt"), "--temperature", "0", "--max-new-tokens", "9",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert r["completion"] == greedy_text(workspace, r["prompt"], 9)
        assert f"{r['prompt']}{r['completion']}\n" in proc.stdout


def test_stop_strings_cut_the_output(workspace):
    full = greedy_text(workspace, "the cat", 20)
    stop = full[3:5]
    assert stop.strip(), full
    proc = run(workspace, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "20", "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the cat" + full[:full.find(stop)] + "\n"


def test_sampling_is_reproducible_with_a_seed(workspace):
    args = ["--prompt", "a", "--temperature", "1.5", "--top-k", "20", "--max-new-tokens", "10", "--ignore-eos"]
    first, again = run(workspace, *args, "--seed", "7"), run(workspace, *args, "--seed", "7")
    assert first.returncode == 0 and first.stdout == again.stdout


@pytest.mark.parametrize("args,message", [
    (["--prompts", "no/such/file.txt"], "no/such/file.txt"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p=1.5"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "x", "--stop", "\n", "--stop", ""], "--stop '' is empty"),
    (["--prompt", "x", "--temperature", "nan"], "temperature=nan"),
    (["--prompt", "x", "--temperature", "inf"], "temperature=inf"),
    (["--prompt", "x", "--device", "nosuch"], "--device 'nosuch'"),
    (["--prompt", "x", "--device", "cpu:1"], "--device 'cpu:1': there is one CPU device"),
    (["--prompt", "x", "--out", "no/such/folder/samples.jsonl"], "no/such/folder does not exist"),
    (["--prompt", ""], "--prompt '' is empty"),
    (["--prompt", "x", "--seed", str(2 ** 64)], f"seed={2 ** 64} must be an integer in [0, 2**64)"),
])
def test_bad_input_is_one_line(workspace, args, message):
    proc = run(workspace, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""  # refused before anything is decoded or streamed


def test_an_empty_prompt_in_a_jsonl_file_is_named_by_line(workspace, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the"}\n{"prompt": ""}\n')
    proc = run(workspace, "--prompts", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {path}:2: the prompt is empty (a prompt needs at least one character)"


def test_past_the_learned_positions_is_refused_before_streaming(workspace):
    proc = run(workspace, "--prompt", "the cat sat on", "--max-new-tokens", "40", model="learned16")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "max_seq_len=16" in line
    fits = run(workspace, "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0", model="learned16")
    assert fits.returncode == 0, fits.stderr


def test_a_vocabulary_padded_past_the_tokenizer_never_yields_its_padding_ids(workspace, tmp_path):
    """Models round their vocabulary up (50304 for a smaller tokenizer): the ids past the tokenizer have no text, so
    the CLI must not sample them (decoding one would fail)."""
    from pretrain.models import build_model, load_model_config
    from pretrain.models.io import export_model

    tmp, tokenizer = workspace
    torch.manual_seed(0)
    cfg = load_model_config(ROOT / "configs/models/tiny_rebased.yaml", [f"vocab_size={tokenizer.vocab_size + 700}"])
    export_model(build_model(cfg), tmp_path / "padded")  # near-flat logits: 70% of each draw is padding
    proc = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(tmp_path / "padded"),
                           "--tokenizer", str(tmp / "tok.model"), "--prompt", "the", "--temperature", "1",
                           "--max-new-tokens", "20", "--ignore-eos", "--seed", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "20 new tokens" in proc.stderr


def test_a_file_with_one_prompt_is_still_a_batch(workspace, tmp_path):
    """The output's form follows the option, not the number of lines: --prompts prints '=== 0: ...' blocks."""
    (tmp_path / "one.txt").write_text("the sea\n")
    proc = run(workspace, "--prompts", str(tmp_path / "one.txt"), "--temperature", "0", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"=== 0: the sea\nthe sea{greedy_text(workspace, 'the sea', 5)}\n\n"


def test_a_jsonl_file_with_a_byte_order_mark(workspace, tmp_path):
    (tmp_path / "p.jsonl").write_bytes("\ufeff".encode() + b'{"prompt": "far"}\n')
    proc = run(workspace, "--prompts", str(tmp_path / "p.jsonl"), "--temperature", "0", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("=== 0: far\n")


def test_stop_escapes_as_typed_in_a_shell():
    from pretrain.generate import cut_at_stop, unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\r") == "a\tb\r" and unescape(r"\\n") == "\\n"
    assert unescape(r"\x") == r"\x" and unescape("é\n") == "é\n"
    assert cut_at_stop("cat\n\nsat on", [unescape(r"\n\n")]) == ("cat", True)


def test_the_stream_follows_a_redirected_stdout(workspace, monkeypatch):
    """In-process (capsys, contextlib.redirect_stdout): the continuation goes where the prompt went."""
    import contextlib
    import io

    from pretrain.generate import main

    tmp, _ = workspace
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["--checkpoint", str(tmp / "model"), "--tokenizer", str(tmp / "tok.model"), "--prompt",
                     "the cat", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    assert buffer.getvalue() == "the cat" + greedy_text(workspace, "the cat", 6) + "\n"


def test_a_tokenizer_without_an_end_of_document_token_is_one_line(workspace, tmp_path):
    """Prompts start after the end-of-document token: a tokenizer without one (SentencePiece eos_id=-1) is refused
    before anything is printed, not an IndexError in the embedding after the prompt was streamed."""
    import sentencepiece as spm

    tmp, _ = workspace
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.jsonl"), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=200, hard_vocab_limit=False, eos_id=-1,
                                   minloglevel=2)
    proc = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(tmp / "model"),
                           "--tokenizer", str(tmp_path / "noeos.model"), "--prompt", "the cat"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no end-of-document token (id -1)" in line
