"""Training: one loop (:mod:`~scenetok.training.trainer`) for every method.

:mod:`~scenetok.training.settings` (defaults + overrides), :mod:`~scenetok.training.run` (the run's state and
setup), :mod:`~scenetok.training.data` (training images, encoded once), :mod:`~scenetok.training.batch`,
:mod:`~scenetok.training.optim`, :mod:`~scenetok.training.previews`, :mod:`~scenetok.training.checkpoint`,
:mod:`~scenetok.training.prior`, :mod:`~scenetok.training.export` (the bundle at the end).
"""

from scenetok.model import load_model
from scenetok.training.settings import TRAIN_DEFAULTS, method_config
from scenetok.training.trainer import TrainingInterrupted, train

__all__ = ["TRAIN_DEFAULTS", "TrainingInterrupted", "load_model", "method_config", "train"]
