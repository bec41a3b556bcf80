"""Draft training (target features, anchors and losses, the trainer), STS calibration, engine
evaluation, and training a small target from local files. See docs in each module."""
from .calibrate import Rounds, ece, fit_sts, record_rounds, report, roc_auc
from .data import Sample, build_samples, load_samples, read_records, save_samples
from .trainer import TrainConfig, train_drafter

__all__ = ["Rounds", "ece", "fit_sts", "record_rounds", "report", "roc_auc", "Sample",
           "build_samples", "load_samples", "read_records", "save_samples", "TrainConfig",
           "train_drafter"]
