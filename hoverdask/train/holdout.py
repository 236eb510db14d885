"""Held-out source images: which images of each dataset folder never enter training.

A hold-out file is JSON, ``{"held_out": {"<dataset folder name>": ["<name pattern>", ...]}}``;
patterns are shell-style (``fnmatch``) on image names, so every tile of one source image is held
out together (``"train_5_*"`` for CoNSeP tiles). Training drops the matching images and validates
on them; evaluation scores only them. Folders the file does not name are used whole for training.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from hoverdask.core.errors import DatasetError
from hoverdask.train.datasets import LabelledSet


@dataclass(frozen=True)
class Holdout:
    patterns: dict[str, tuple[str, ...]]
    source: str = "hold-out"

    @classmethod
    def read(cls, path: str | Path) -> Holdout:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            held = raw["held_out"]
            patterns = {str(k): tuple(str(p) for p in v) for k, v in held.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DatasetError(
                f"{path}: not a hold-out file ({err}); expected "
                '{"held_out": {"<dataset folder>": ["<image name pattern>", ...]}}'
            ) from None
        return cls(patterns, str(path))

    def held_out(self, dataset: LabelledSet, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns.get(dataset.root.name, ()))

    def split(self, dataset: LabelledSet) -> tuple[LabelledSet, LabelledSet]:
        """(training images, held-out images) of ``dataset``."""
        train = dataset.subset(lambda name: not self.held_out(dataset, name))
        held = dataset.subset(lambda name: self.held_out(dataset, name))
        for pattern in self.patterns.get(dataset.root.name, ()):
            if not any(fnmatch.fnmatchcase(ref.name, pattern) for ref in dataset.refs):
                raise DatasetError(f"{self.source}: {pattern!r} matches no image of {dataset.root}")
        return train, held
