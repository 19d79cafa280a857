"""Training: one loop (:mod:`~scenetok.training.trainer`) for every method.

:mod:`~scenetok.training.settings` (defaults + overrides), :mod:`~scenetok.training.run` (the run's state and
setup), :mod:`~scenetok.training.data` (training images, encoded once), :mod:`~scenetok.training.batch`,
:mod:`~scenetok.training.optim`, :mod:`~scenetok.training.previews`, :mod:`~scenetok.training.checkpoint`,
:mod:`~scenetok.training.prior`, :mod:`~scenetok.training.export` (the bundle at the end),
:mod:`~scenetok.training.rundir` (the run folder ``OUT.partial``, swapped in when complete),
:mod:`~scenetok.training.signals` (Ctrl-C / SIGTERM taken at a step boundary).
"""

from scenetok.model import load_model
from scenetok.training.settings import TRAIN_DEFAULTS, method_config
from scenetok.training.rundir import run_dir
from scenetok.training.trainer import TrainingDiverged, TrainingInterrupted, train

__all__ = ["TRAIN_DEFAULTS", "TrainingDiverged", "TrainingInterrupted", "load_model", "method_config", "run_dir", "train"]
