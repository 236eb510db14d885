"""Training HoVer-Net: datasets, targets, augmentation, the paper's loss and the two-stage loop."""

from __future__ import annotations

from hoverdask.train.datasets import LabelledImage, LabelledSet, open_dataset
from hoverdask.train.loop import TrainConfig, TrainResult, train
from hoverdask.train.losses import LossWeights, hovernet_loss
from hoverdask.train.targets import hv_map, make_targets

__all__ = [
    "LabelledImage",
    "LabelledSet",
    "LossWeights",
    "TrainConfig",
    "TrainResult",
    "hovernet_loss",
    "hv_map",
    "make_targets",
    "open_dataset",
    "train",
]
