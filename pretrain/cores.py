"""How many CPU cores this process may use (its affinity mask where the OS has one, as under Slurm or taskset)."""

import os


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
