"""Everything that runs inside a training process: config schemas, data, models, DeepSpeed engines,
checkpoints, metrics and the stages themselves. Never imports `rlhf_cli`."""

__version__ = "0.1.0"
