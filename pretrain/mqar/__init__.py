"""Multi-Query Associative Recall (MQAR): the ReBased paper's headline benchmark, offline and reproducible.

* ``pretrain.mqar.data``    generator (Zoology's task definition), on-disk cache, on-device batches
* ``pretrain.mqar.config``  the run config (``python -m pretrain.mqar --config configs/mqar/<...>.yaml``)
* ``pretrain.mqar.train``   training / evaluation of one setting, one JSON result
* ``pretrain.mqar.sweep``   the grid: local GPUs (one process per GPU) or a Slurm array, skipping finished runs
* ``pretrain.mqar.report``  table + figure (one panel per sequence length, accuracy vs d_model)
"""

from pretrain.mqar.data import MQARSpec, MQARSplit, default_num_kv_pairs, load_mqar

__all__ = ["MQARSpec", "MQARSplit", "default_num_kv_pairs", "load_mqar"]
