"""Training: one loop for every method (see :mod:`scenetok.training.trainer`)."""

from scenetok.training.trainer import TRAIN_DEFAULTS, TrainingInterrupted, load_model, method_config, train

__all__ = ["TRAIN_DEFAULTS", "TrainingInterrupted", "load_model", "method_config", "train"]
