"""Speed and quality benchmarks, each a module run from the repository root: ``python -m benchmarks.<name>``.

Every script writes its figures with the device, date and command to ``benchmarks/results/`` (``results_io``)."""
