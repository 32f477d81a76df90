"""The pretraining loop's parts: run config, parallelism strategies, checkpoints, optimiser/schedule, metrics."""
