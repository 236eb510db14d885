"""Training batches: random windows from several datasets, augmented, with their targets.

Batch ``k`` is drawn with a generator seeded by ``(seed, k)``, so a run is reproducible and a
resumed run sees exactly the batches it would have seen, whatever the number of loader workers.
Images are drawn with probability proportional to their area at the model's pixel size (a large
image holds more windows).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from hoverdask.core.errors import DatasetError
from hoverdask.train.augment import (
    Window,
    affine_crop,
    centre_window,
    colour_jitter,
    mirror_window,
    random_window,
    stain_jitter,
)
from hoverdask.train.datasets import LabelledSet
from hoverdask.train.targets import Targets, make_targets


class WindowSource(torch.utils.data.Dataset):
    """Map-style source of whole batches: ``source[k]`` is batch ``k`` as a dict of tensors."""

    def __init__(
        self,
        datasets: Sequence[LabelledSet],
        *,
        input_size: int,
        output_size: int,
        nr_types: int | None,
        batch_size: int,
        seed: int,
        augment: bool = True,
        dataset_weights: Sequence[float] | None = None,
    ) -> None:
        if not datasets:
            raise DatasetError("no training data given")
        factors = [1.0] * len(datasets) if dataset_weights is None else list(dataset_weights)
        if len(factors) != len(datasets):
            raise DatasetError(f"{len(factors)} dataset weights for {len(datasets)} datasets")
        self.datasets = list(datasets)
        self.input_size = input_size
        self.output_size = output_size
        self.nr_types = nr_types
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.index = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]
        # windows fall evenly over pixels; a dataset weight multiplies that dataset's share
        areas = np.concatenate(
            [ds.areas() * factor for ds, factor in zip(self.datasets, factors, strict=True)]
        )
        self.weights = areas / areas.sum()
        if nr_types is not None and not any(ds.has_types for ds in self.datasets):
            raise DatasetError(
                "--nr-types was given but no dataset has nucleus types; leave it out to train "
                "segmentation only (np and hv branches)"
            )

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        rngs = np.random.default_rng([self.seed, k]).spawn(self.batch_size)
        return collate([self.sample(rng) for rng in rngs])

    def sample(self, rng: np.random.Generator) -> tuple[Window, Targets, bool]:
        d, i = self.index[int(rng.choice(len(self.index), p=self.weights))]
        dataset = self.datasets[d]
        item = dataset[i]
        typed = self.nr_types is not None and item.types is not None
        win = Window(item.image, item.inst, item.types if typed else None)
        if typed:
            check_types(win.types, self.nr_types, f"{dataset.root}/{item.name}")
        if self.augment:
            win = affine_crop(random_window(win, self.input_size, rng), self.input_size, rng)
            win = Window(colour_jitter(stain_jitter(win.image, rng), rng), win.inst, win.types)
        else:
            win = centre_window(random_window(win, self.input_size, rng), self.input_size)
        return win, self.targets(win), typed

    def targets(self, win: Window) -> Targets:
        out = (self.output_size, self.output_size)
        return make_targets(win.inst, win.types, out)


def check_types(types: np.ndarray, nr_types: int, where: str) -> None:
    highest = int(types.max(initial=0))
    if highest >= nr_types:
        raise DatasetError(
            f"{where}: type {highest} found but the model has --nr-types {nr_types} "
            f"(classes 0..{nr_types - 1}, 0 = background)"
        )


def collate(samples: Sequence[tuple[Window, Targets, bool]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``image`` N3HW float 0..255, ``np``/``tp`` NHW, ``hv`` N2HW, ``has_types``."""
    images = np.stack([win.image for win, _, _ in samples]).astype(np.float32)
    out_shape = samples[0][1].np.shape
    batch = {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "np": torch.from_numpy(np.stack([t.np for _, t, _ in samples])),
        "hv": torch.from_numpy(np.stack([t.hv for _, t, _ in samples])).permute(0, 3, 1, 2),
        "has_types": torch.tensor([typed for _, _, typed in samples]),
    }
    tp = [t.tp if typed and t.tp is not None else np.zeros(out_shape, np.int64)
          for _, t, typed in samples]
    batch["tp"] = torch.from_numpy(np.stack(tp))
    return batch


def validation_windows(
    datasets: Sequence[LabelledSet], input_size: int, count: int
) -> list[Window]:
    """Up to ``count`` fixed, unaugmented windows: a grid of input-sized squares per image,
    taken from the datasets in turn so that each is represented."""
    per_dataset = [_grid_windows(dataset, input_size, count) for dataset in datasets]
    windows: list[Window] = []
    for group in itertools.zip_longest(*per_dataset):
        windows.extend(win for win in group if win is not None)
    return windows[:count]


def _grid_windows(dataset: LabelledSet, input_size: int, count: int) -> list[Window]:
    windows: list[Window] = []
    for item in dataset:
        height, width = item.inst.shape
        for top in range(0, max(height - input_size, 0) + 1, input_size):
            for left in range(0, max(width - input_size, 0) + 1, input_size):
                src = Window(item.image, item.inst, item.types)
                windows.append(mirror_window(src, top, left, input_size))
                if len(windows) >= count:
                    return windows
    return windows
