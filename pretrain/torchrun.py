"""torchrun for the trainer: ``python -m pretrain.torchrun [torchrun options] -m pretrain.train --config ...``

The same launcher as ``torchrun`` (same options, same elastic agent), with two differences that a scheduler
depends on (``launch/pretrain.sh`` and ``launch/slurm/pretrain.sbatch`` start the trainer through it):

* Exit codes. When the workers stop with one of the trainer's own codes (2 configuration error, 3 too many
  non-finite steps) and reported their one-line message, it is printed once and the launcher exits with that
  code, instead of torchrun's exit 1 and its error dump. Any other failure keeps torchrun's report.
  The workers hand their messages over through REBASED_ERROR_DIR (see ``pretrain.training.errors.report_error``); when the
  caller already set it (the sbatch, which has one launcher per node), the caller prints them.
* Signals. SIGUSR1 and SIGTERM reaching the launcher are forwarded to the workers, which save a checkpoint and
  exit 0, and the launcher waits for them and exits 0 too. (torchrun dies on SIGUSR1 and leaves the workers
  running; on SIGTERM it exits 1 and kills the workers after its shutdown timeout, saved or not.) A signal that
  arrives before any worker runs, or while the workers start (before their first step: nothing to save), stops the
  launcher with 128 + the signal's number and one line; like torchrun's own handlers, it is acted on once the agent
  is back in Python, so during a rendezvous only when the rendezvous returns. Later signals (a scheduler's SIGTERM
  after its SIGUSR1) are forwarded too, and change nothing once the workers have saved.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

from pretrain.training.errors import ERROR_DIR_ENV, EXIT_CONFIG, EXIT_NONFINITE

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
# The agent's own reports about workers that exited (a failure, the closing signals it sent): held back until the
# outcome is known, shown when it is not one of our clean exits.
HELD_LOGGERS = ("torch.distributed.elastic.multiprocessing", "torch.distributed.elastic.agent")


def worker_pids() -> list[int]:
    """The launcher's child processes: the workers (the elastic agent starts them with Popen; Linux /proc)."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            if parent == me:
                pids.append(int(entry.name))
    return pids


# signals forwarded to the workers so far (a worker killed by one of them had not installed its handler yet)
FORWARDED_SO_FAR: list[int] = []


def forward(signum, frame):
    pids = worker_pids()
    if not pids:
        if FORWARDED_SO_FAR:  # the workers got an earlier signal and are gone (saved, or being reaped): nothing to do
            return
        # nothing to save yet: stop the agent through its own shutdown path
        raise SignalException(f"launcher got {signal.Signals(signum).name} before any worker started",
                              sigval=signal.Signals(signum))
    FORWARDED_SO_FAR.append(signum)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def killed_by_forwarded_signal(error: ChildFailedError) -> int | None:
    """The forwarded signal that killed every failed worker (they were still starting: the trainer installs its
    handlers when training begins), else None."""
    codes = {failure.exitcode for failure in error.failures.values()}
    if not codes or not codes <= {-s for s in FORWARDED_SO_FAR}:
        return None
    return next(s for s in FORWARDED_SO_FAR if -s in codes)


class Held(logging.Filter):
    """On the agent's loggers (a logger's own filter: torch's logging set-up may reset handlers and propagation,
    it leaves filters alone): keeps their records back until ``release``."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict
                        if name.startswith(HELD_LOGGERS)]
        for logger in self.loggers:
            logger.addFilter(self)

    def filter(self, record):
        self.records.append(record)
        return False

    def release(self):
        for logger in self.loggers:
            logger.removeFilter(self)
        for r in self.records:
            logging.getLogger(r.name).handle(r)


def reported_messages(folder: str) -> list[str]:
    """Each distinct message the ranks reported, in rank order."""
    lines = []
    for f in sorted(Path(folder).glob("rank-*")):
        message = f.read_text().partition("\t")[2].strip()
        if message and message not in lines:
            lines.append(message)
    return lines


@record
def main(argv=None) -> int:
    args = parse_args(argv)
    args.signals_to_handle = ",".join(  # the agent keeps SIGINT etc.; SIGUSR1 and SIGTERM are ours
        s for s in args.signals_to_handle.split(",") if s.strip() and s.strip() not in {f.name for f in FORWARDED})
    for sig in FORWARDED:
        signal.signal(sig, forward)
    own_dir = not os.environ.get(ERROR_DIR_ENV)
    if own_dir:
        os.environ[ERROR_DIR_ENV] = tempfile.mkdtemp(prefix="rebased-errors-")
    folder = os.environ[ERROR_DIR_ENV]
    held = Held()
    try:
        run(args)
        held.release()
        return 0
    except ChildFailedError as e:
        stopped_by = killed_by_forwarded_signal(e)
        if stopped_by is not None:  # nothing was trained yet, so nothing needed saving: as a signal before the start
            print(f"pretrain.torchrun: the workers were stopped by {signal.Signals(stopped_by).name} while starting, "
                  "before any training step (nothing to save)", file=sys.stderr, flush=True)
            return 128 + stopped_by
        code = e.get_first_failure()[1].exitcode
        messages = reported_messages(folder)
        if code not in (EXIT_CONFIG, EXIT_NONFINITE) or not messages:
            held.release()
            raise
        if own_dir:
            for m in messages:
                print(m, file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        held.release()
        print(f"pretrain.torchrun: {e}", file=sys.stderr, flush=True)
        return 128 + e.sigval
    finally:
        # the workers are gone: a late signal must not kill the launcher now (Python restores the default action of
        # handled signals while it shuts down; an ignored one stays ignored)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
