"""How the trainer ends on an error: its exit codes and its one-line message, handed to the launcher when one
collects the ranks' messages. Standard library only: the launcher (``pretrain.torchrun``) imports it."""

from __future__ import annotations

import os
import sys

EXIT_NONFINITE = 3
EXIT_CONFIG = 2
ERROR_DIR_ENV = "REBASED_ERROR_DIR"


class NonFiniteError(RuntimeError):
    pass


def report_error(code: int, message: str) -> None:
    """Our one-line message for exit code ``code``. Under a launcher that collects the ranks' messages (it sets
    REBASED_ERROR_DIR: ``pretrain.torchrun``, ``launch/slurm/pretrain.sbatch``) it goes to a file per rank and the
    launcher prints each distinct one once; otherwise this process prints it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        print(message, file=sys.stderr, flush=True)
        return
    with open(os.path.join(folder, f"rank-{int(os.environ.get('RANK', '0')):05d}"), "w") as f:
        f.write(f"{code}\t{message}\n")
