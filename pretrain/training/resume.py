"""Which checkpoint a run resumes from, verified by all ranks before anything is trusted."""

from __future__ import annotations

import logging
import os

from pretrain.config import ConfigError
from pretrain.training import checkpoint as ckpt
from pretrain.training.distributed import all_gather_object, barrier

log = logging.getLogger("pretrain")


def verify_together(path: str, rank: int, world: int) -> list[str]:
    """Problems of checkpoint ``path`` found by all ranks together (each checks a share of the files)."""
    found = [p for share in all_gather_object(ckpt.verify(path, rank, world)) for p in share]
    return list(dict.fromkeys(found))  # every rank reports a bad marker: once is enough


def find_resume(resume: str, root: str, rank: int, world: int) -> str | None:
    """The checkpoint to resume from (``checkpoint.resume``), verified. ``auto``: the newest under the run's
    checkpoint ``root`` that verifies; newer ones that fail are moved aside (``step_N.corrupt``) and named in one
    line. A checkpoint root given as ``resume``: the same, without moving anything. One checkpoint given: it must
    verify. ``none``: None."""
    if resume == "none":
        return None
    if resume != "auto" and ckpt.is_complete(resume):
        problems = verify_together(resume, rank, world)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise ckpt.CheckpointError(f"checkpoint.resume={resume}: refusing to resume from it, it fails "
                                       f"verification: {problems[0]}{more}")
        return resume
    if resume != "auto":
        root = resume
    candidates = [path for _, path in reversed(ckpt.list_complete(root))]
    if resume != "auto" and not candidates:
        raise ConfigError(f"checkpoint.resume={resume!r}: no complete checkpoint there")
    chosen, rejected = None, []
    for path in candidates:
        problems = verify_together(path, rank, world)
        if not problems:
            chosen = path
            break
        rejected.append((path, problems))
    if not rejected:
        return chosen
    why = "; ".join(f"{os.path.basename(p)}: {probs[0]}" + (f" (+{len(probs) - 1} more)" if len(probs) > 1 else "")
                    for p, probs in rejected)
    if chosen is None:  # nothing is moved: a rerun must not silently start over
        raise ckpt.CheckpointError(
            f"no checkpoint in {root} passes verification, refusing to resume ({why}); restore the files, or "
            f"start over with checkpoint.resume=none")
    moved = ""
    if resume == "auto":
        if rank == 0:
            for path, _ in rejected:
                ckpt.move_aside(path)
        barrier()
        moved = ", moved aside as .corrupt"
    if rank == 0:
        log.warning("resume: %d newer checkpoint(s) failed verification%s (%s); resuming from the newest that "
                    "verifies, %s", len(rejected), moved, why, chosen)
    return chosen
