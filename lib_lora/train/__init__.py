"""Training engine: typed config, data pipeline, optimizers, schedulers, families, loop, checkpoints.

Submodules are imported where they are used (`lib_lora.train.config`, `lib_lora.train.data`, ...): importing
this package loads nothing heavy.
"""
