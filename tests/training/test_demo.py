"""``launch/demo.sh`` (``pretrain.demo``) rerun on the state an earlier run left: the pipeline's commands are recorded
instead of run (each one "finishes" by creating the file that marks it done), so only the demo's own decisions are
tested: what a rerun skips and what it redoes."""

from __future__ import annotations

import json

import pytest

from pretrain import demo


@pytest.fixture
def commands(monkeypatch):
    ran = []

    def run(cmd, done=None):
        if done is not None and done.exists():
            return
        ran.append(" ".join(cmd))
        if done is not None:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("")

    monkeypatch.setattr(demo, "run", run)
    monkeypatch.setattr(demo, "plot_losses", lambda runs, out: None)
    return ran


def count(ran: list[str], text: str) -> int:
    return sum(text in c for c in ran)


def test_an_interrupted_training_run_starts_over_clean(commands, tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "10"])
    assert count(commands, "launch/pretrain.sh") == 2 and count(commands, "--checkpoint") == 2
    # the rebased run was interrupted: no export yet, a metrics.jsonl the new run would append to, an old evaluation
    (out / "rebased" / "export" / "model.safetensors").unlink()
    (out / "rebased" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    commands.clear()
    demo.main(["--out", str(out), "--steps", "10"])
    assert count(commands, f"out_dir={out / 'rebased'}") == 1 and count(commands, "launch/pretrain.sh") == 1
    assert not (out / "rebased" / "metrics.jsonl").exists(), "the interrupted run's metrics were kept"
    assert count(commands, f"--out {out / 'eval_rebased.json'}") == 1, "the old evaluation was kept"


def test_other_settings_redo_what_depends_on_them(commands, tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "10"])
    commands.clear()
    demo.main(["--out", str(out), "--steps", "10"])  # nothing changed: nothing to do but the comparison
    assert commands == [c for c in commands if " compare " in c] and len(commands) == 1

    commands.clear()
    demo.main(["--out", str(out), "--steps", "20"])
    assert count(commands, "training.max_steps=20") == 2 and count(commands, "--checkpoint") == 2
    assert count(commands, "train_tokenizer.py") == 0 and count(commands, "tokenize_pile.py") == 0

    commands.clear()
    demo.main(["--out", str(out), "--steps", "20", "--vocab-size", "1024"])
    assert count(commands, "--vocab-size 1024") == 1 and count(commands, "tokenize_pile.py") == 1
    assert count(commands, "model_overrides=[vocab_size=1024]") == 2 and count(commands, "--checkpoint") == 2


@pytest.mark.parametrize("option, value", [("--steps", "-1"), ("--steps", "0"), ("--vocab-size", "0")])
def test_bad_settings_are_refused_before_an_earlier_demo_is_touched(commands, tmp_path, capsys, option, value):
    """--steps -1 removed the earlier demo's runs and results, then failed in the trainer."""
    out = tmp_path / "demo"
    demo.main(["--out", str(out)])
    kept = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(out), option, value])
    assert e.value.code == 2 and f"{option} must be >= 1" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == kept


def test_a_failing_step_stops_the_demo_with_its_exit_code(tmp_path, capsys):
    import sys

    with pytest.raises(SystemExit) as e:
        demo.run([sys.executable, "-c", "import sys; print('bad input', file=sys.stderr); sys.exit(2)"])
    assert e.value.code == 2 and "exited with code 2" in capsys.readouterr().err
