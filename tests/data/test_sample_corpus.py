"""The embedded sample corpus builder (data_prep/build_sample_corpus.py): bad sizes are refused with one line, and a
rebuild with fewer train files leaves none of the earlier build's behind."""

from __future__ import annotations

import os

import pytest

from data_prep.build_sample_corpus import build, main


def test_a_rebuild_with_fewer_train_files_removes_the_earlier_ones(tmp_path):
    first = build(str(tmp_path), max_mb=0.2, train_files=3)
    assert sorted(os.listdir(tmp_path / "train")) == ["00.jsonl.zst", "01.jsonl.zst", "02.jsonl.zst"]
    assert all(docs > 0 for docs, _ in first.values())
    build(str(tmp_path), max_mb=0.2, train_files=1)
    assert os.listdir(tmp_path / "train") == ["00.jsonl.zst"]
    assert sorted(os.listdir(tmp_path)) == ["test.jsonl.zst", "train", "val.jsonl.zst"]


@pytest.mark.parametrize("args,message", [
    (["--train-files", "0"], "--train-files must be >= 1, got 0"),
    (["--max-mb", "0"], "--max-mb must be > 0, got 0.0"),
    (["--max-mb", "0.01"], "test documents: every one of the 2 train files and both held-out files needs at least"),
    (["--max-mb", "0.2", "--train-files", "100000"], "every one of the 100000 train files"),
])
def test_sizes_that_would_write_an_empty_file_are_refused(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "c"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
