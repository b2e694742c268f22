"""The run engine every training job plugs into: the run folder, the trainer skeleton, checkpoints, the budget
clock, processes (DDP), EMA and the metrics log. Jobs (`train/`, `pretrain/`, `dense/`) give it a task."""
