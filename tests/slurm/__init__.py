"""A package, so that pytest imports this directory's conftest as ``slurm.conftest``: a second top-level
``conftest`` module would shadow the one ``tests/training`` imports its helpers from."""
