"""The two-stage HoVer-Net training schedule, checkpoints, resume and the metrics log.

Stage one trains the decoders with the encoder frozen; stage two fine-tunes everything (the
paper's schedule; the reference runs 50 + 50 epochs). Each stage gets a fresh Adam optimiser
(betas 0.9/0.999) at 1e-4, dropped to 1e-5 for the second half of the stage (the reference's
StepLR at epoch 25 of 50).

Files written, each atomically:

* ``--out``: the model in the official ``{"desc": state_dict}`` layout plus plain metadata
  (readable by :func:`hoverdask.model.load_model`, the reference code and TIAToolbox);
* ``<out>.state``: optimiser state and step, to resume;
* ``<out>.csv`` (or ``log``): one row per step and per validation pass.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hoverdask.core.atomic import atomic_write
from hoverdask.core.errors import CheckpointError, HoverdaskError
from hoverdask.model.build import Network, build_network
from hoverdask.model.checkpoints import load_model, save_checkpoint
from hoverdask.model.geometry import MODES, patch_geometry
from hoverdask.model.infer import resolve_device
from hoverdask.model.lite import LITE_MODE
from hoverdask.model.network import centre_crop
from hoverdask.train.augment import Window
from hoverdask.train.batches import WindowSource, check_types, collate, validation_windows
from hoverdask.train.datasets import LabelledSet, open_dataset
from hoverdask.train.holdout import Holdout
from hoverdask.train.losses import LossWeights, hovernet_loss
from hoverdask.train.options import name_and_number
from hoverdask.train.targets import make_targets

LOSS_TERMS = ("hv_mse", "hv_msge", "np_ce", "np_dice", "tp_ce", "tp_dice")
LOG_COLUMNS = ("step", "stage", "lr", "loss", *LOSS_TERMS, "seconds")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("paper", "cosine")
# the lite network pads its convolutions: its training windows keep a thinner unsupervised border
# (context on every side) than the patch margin used at inference
LITE_TRAIN_MARGIN = 16
LITE_TRAIN_INPUT = 256  # the lite network's default training window (its patch is 512)
COSINE_WARMUP = 0.03  # fraction of the steps with a linear warm-up
COSINE_FLOOR = 0.01  # the last learning rate, as a fraction of --lr


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (stored in the checkpoint metadata)."""

    data: tuple[Path, ...]
    out: Path
    mode: str = "fast"
    nr_types: int | None = None
    steps: int = 1000
    batch_size: int = 4
    device: str = "auto"
    init: Path | None = None
    val: tuple[Path, ...] = ()
    resume: bool = False
    stage_one_fraction: float = 0.5
    lr: float | None = None  # None: 1e-4 for the paper's schedule, 2e-3 for cosine
    lr_late: float = 1e-5
    schedule: str | None = None  # None: "paper" for fast/original, "cosine" for lite
    weight_decay: float = 1e-4  # AdamW's, with the cosine schedule
    holdout: Path | None = None
    seed: int = 10
    precision: str = "auto"
    save_every: int = 0
    val_every: int = 0
    val_windows: int = 32
    workers: int = 0
    augment: bool = True
    log: Path | None = None
    weights: LossWeights = field(default_factory=LossWeights)
    input_size: int | None = None  # training window side; None: the mode's patch input
    # (dataset folder name, factor): multiplies that dataset's share of the training windows
    data_weights: tuple[tuple[str, float], ...] = ()

    def window_sizes(self) -> tuple[int, int]:
        """(input, output) sides: the network's output is its input less a fixed border."""
        geometry = patch_geometry(self.mode)
        lite = self.mode == LITE_MODE
        size = self.input_size or (LITE_TRAIN_INPUT if lite else geometry.input)
        border = 2 * LITE_TRAIN_MARGIN if lite else geometry.input - geometry.output
        output = size - border
        if output < 1:
            raise HoverdaskError(f"training window {size} is smaller than the network's border")
        return size, output

    @property
    def schedule_name(self) -> str:
        return self.schedule or ("cosine" if self.mode == LITE_MODE else "paper")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.schedule_name == "cosine" else 1e-4)

    @property
    def stage_one_steps(self) -> int:
        if self.schedule_name == "cosine":
            return 0  # nothing pretrained to protect: everything trains from the first step
        return round(self.steps * self.stage_one_fraction)

    @property
    def log_path(self) -> Path:
        return self.log or self.out.with_name(self.out.name + ".csv")

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.name + ".state")


@dataclass(frozen=True)
class StepLog:
    """One row of the metrics log."""

    step: int
    stage: str
    lr: float | None
    loss: float
    terms: dict[str, float]
    seconds: float

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "stage": self.stage, "lr": self.lr or ""}
        row["loss"] = f"{self.loss:.6g}"
        for name in LOSS_TERMS:
            row[name] = f"{self.terms[name]:.6g}" if name in self.terms else ""
        row["seconds"] = f"{self.seconds:.3f}"
        return row


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    log: Path
    steps: int
    last: StepLog | None
    notes: list[str]


def schedule(config: TrainConfig, step: int) -> tuple[int, float]:
    """(stage, learning rate) of 0-based ``step``.

    "paper": two stages of equal length, each at ``lr`` then ``lr_late`` for its second half.
    "cosine": one stage; a linear warm-up, then cosine decay from ``lr`` to 1 % of it.
    """
    if config.schedule_name == "cosine":
        warmup = max(1, round(COSINE_WARMUP * config.steps))
        if step < warmup:
            return 2, config.peak_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 2, config.peak_lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * cosine)
    first = config.stage_one_steps
    stage, start, length = (1, 0, first) if step < first else (2, first, config.steps - first)
    late = step - start >= length / 2
    return stage, config.lr_late if late else config.peak_lr


def train(
    config: TrainConfig, progress: Callable[[StepLog], None] | None = None
) -> TrainResult:
    """Run (or resume) the schedule and write checkpoint, state and log; returns what it did."""
    _check_config(config)
    notes: list[str] = []
    device = resolve_device(config.device)
    amp_dtype = _amp_dtype(config.precision, device)
    torch.manual_seed(config.seed)
    datasets, held_out = _training_data(config)
    notes += [f"data: {ds.describe()}" for ds in datasets]
    notes += [f"held out for validation: {ds.describe()}" for ds in held_out]
    input_size, output_size = config.window_sizes()
    source = WindowSource(
        datasets, input_size=input_size, output_size=output_size,
        nr_types=config.nr_types, batch_size=config.batch_size, seed=config.seed,
        augment=config.augment, dataset_weights=_dataset_weights(config, datasets),
    )
    val_batches = _validation_batches(config, input_size, output_size, held_out)
    model, start, optimiser_state = _starting_point(config, notes)
    model.to(device)
    memory_format = _memory_format(model, device)
    model.to(memory_format=memory_format)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    writer = _LogWriter(config.log_path, append=config.resume, resume_step=start)
    last: StepLog | None = None
    optimiser: torch.optim.Optimizer | None = None
    current_stage = 0
    tic = time.perf_counter()
    try:
        for step, batch in _batches(source, start, config):
            stage, lr = schedule(config, step)
            if stage != current_stage:
                optimiser = _optimiser(model, config, lr)
                if optimiser_state is not None and optimiser_state["stage"] == stage:
                    optimiser.load_state_dict(optimiser_state["optimizer"])
                optimiser_state = None
                model.set_freeze(stage == 1)
                current_stage = stage
            assert optimiser is not None
            for group in optimiser.param_groups:
                group["lr"] = lr
            batch["image"] = batch["image"].contiguous(memory_format=memory_format)
            loss, terms = _train_step(model, batch, optimiser, config, device, amp_dtype, scaler)
            if not np.isfinite(loss):
                raise HoverdaskError(
                    f"the loss became {loss} at step {step + 1}; the last checkpoint is kept. "
                    "Try --precision fp32 or bf16, or resume from the last checkpoint"
                )
            last = StepLog(step + 1, str(stage), lr, loss, terms, time.perf_counter() - tic)
            writer.write(last)
            done = step + 1
            stage_end = done in (config.stage_one_steps, config.steps)
            if stage_end or (config.save_every and done % config.save_every == 0):
                _save(model, optimiser, config, done, stage, datasets)
            if progress:
                progress(last)
            if val_batches and (stage_end or (config.val_every and done % config.val_every == 0)):
                val = validate(model, val_batches, config, device, amp_dtype)
                row = StepLog(done, f"val{stage}", None, val[0], val[1], time.perf_counter() - tic)
                writer.write(row)
                if progress:
                    progress(row)
    finally:
        writer.close()
    if start >= config.steps:
        notes.append(f"{config.out} already holds step {start} of {config.steps}: nothing to do")
    return TrainResult(config.out, config.log_path, config.steps, last, notes)


def _starting_point(
    config: TrainConfig, notes: list[str]
) -> tuple[Network, int, dict[str, Any] | None]:
    """The model to train, the step to start from and any saved optimiser state."""
    model = build_network(config.mode, config.nr_types)
    if config.resume:
        start, state = _load_resume(config, model)
        notes.append(f"resumed from {config.out} at step {start}")
        return model, start, state
    if config.init is not None:
        notes.append(initialise_from(model, config.init))
    else:
        notes.append("no --init: the encoder starts from random weights")
    return model, 0, None


def _training_data(config: TrainConfig) -> tuple[list[LabelledSet], list[LabelledSet]]:
    """The training datasets, less any held-out images, and the held-out parts (non-empty)."""
    datasets = [open_dataset(path) for path in config.data]
    if config.holdout is None:
        return datasets, []
    holdout = Holdout.read(config.holdout)
    parts = [holdout.split(ds) for ds in datasets]
    return [train for train, _ in parts if len(train)], [held for _, held in parts if len(held)]


def _dataset_weights(config: TrainConfig, datasets: Sequence[LabelledSet]) -> list[float]:
    """Each training dataset's factor from ``config.data_weights`` (1 where not named)."""
    factors = dict(config.data_weights)
    return [factors.get(ds.root.name, 1.0) for ds in datasets]


def _memory_format(model: Network, device: torch.device) -> torch.memory_format:
    """channels_last for the lite network on CPU: its training steps ran ~1.5x faster (oneDNN)."""
    if model.mode == LITE_MODE and device.type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def _optimiser(model: Network, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if config.schedule_name == "cosine":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


def _crop_to_targets(
    logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Padded networks (lite) return the input's size: keep the centre the targets cover."""
    height, width = batch["np"].shape[-2:]
    return {k: centre_crop(v, height, width) if v.shape[-2:] != (height, width) else v
            for k, v in logits.items()}


def _check_config(config: TrainConfig) -> None:
    if config.mode not in MODES:
        raise HoverdaskError(f"--mode must be one of {MODES}, got {config.mode!r}")
    if config.steps < 1:
        raise HoverdaskError("--steps must be at least 1")
    if config.batch_size < 1:
        raise HoverdaskError("--batch-size must be at least 1")
    if not 0.0 <= config.stage_one_fraction <= 1.0:
        raise HoverdaskError("the stage-one fraction must be between 0 and 1")
    if config.schedule is not None and config.schedule not in SCHEDULES:
        raise HoverdaskError(f"--schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.precision not in PRECISIONS:
        raise HoverdaskError(f"--precision must be one of {PRECISIONS}")
    if config.nr_types is not None and config.nr_types < 2:
        raise HoverdaskError("--nr-types counts the background too: use 2 or more, or leave out")
    if config.resume and config.init is not None:
        raise HoverdaskError("--resume continues --out; it cannot be combined with --init")
    names = {Path(p).name for p in config.data}
    for name, factor in config.data_weights:
        if name not in names:
            raise HoverdaskError(
                f"--data-weight {name}: no --data folder has that name "
                f"(the folders are: {', '.join(sorted(names))})"
            )
        if not factor > 0:
            raise HoverdaskError(f"--data-weight {name}: the factor must be above 0, got {factor}")


def parse_data_weights(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``["consep-train-tiles=2"]`` -> ``(("consep-train-tiles", 2.0),)``; the names and
    factors themselves are checked with the rest of the configuration (``_check_config``)."""
    pairs: list[tuple[str, float]] = []
    for item in items:
        name, factor = name_and_number(item)
        if not name or math.isnan(factor):  # no "=", no name, or not a number
            raise HoverdaskError(
                f"--data-weight {item!r}: expected FOLDER=FACTOR, FOLDER the name of a --data "
                "folder and FACTOR a number above 0"
            )
        pairs.append((name, factor))
    return tuple(pairs)


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise HoverdaskError(f"--precision {precision} needs a CUDA device; use fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(
    source: WindowSource, start: int, config: TrainConfig
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    steps = range(start, config.steps)
    if config.workers == 0:
        for step in steps:
            yield step, source[step]
        return
    loader = torch.utils.data.DataLoader(
        source, batch_size=None, sampler=list(steps), num_workers=config.workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
    yield from zip(steps, loader, strict=True)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _train_step(
    model: Network,
    batch: dict[str, torch.Tensor],
    optimiser: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[float, dict[str, float]]:
    model.train()
    batch = _to(batch, device)
    optimiser.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        logits = _crop_to_targets(model(batch["image"]), batch)
    loss, terms = hovernet_loss(logits, batch, config.weights)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
    else:
        loss.backward()
        optimiser.step()
    return float(loss.detach()), terms


def _validation_batches(
    config: TrainConfig, input_size: int, output_size: int, held_out: Sequence[LabelledSet] = ()
) -> list[dict[str, torch.Tensor]]:
    """Fixed windows of the --val folders, or else of the held-out images."""
    datasets = [open_dataset(path) for path in config.val] if config.val else list(held_out)
    if not datasets:
        return []
    windows = validation_windows(datasets, input_size, config.val_windows)
    samples = []
    for win in windows:
        typed = config.nr_types is not None and win.types is not None
        if typed:
            check_types(win.types, config.nr_types, "validation data")
        win = Window(win.image, win.inst, win.types if typed else None)
        samples.append((win, make_targets(win.inst, win.types, (output_size,) * 2), typed))
    size = max(1, config.batch_size)
    return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]


@torch.no_grad()
def validate(
    model: Network,
    batches: Sequence[dict[str, torch.Tensor]],
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, dict[str, float]]:
    """Mean loss and terms over fixed validation windows (eval mode, no augmentation)."""
    model.eval()
    totals: dict[str, list[float]] = {}
    losses = []
    for batch in batches:
        batch = _to(batch, device)
        with _autocast(device, amp_dtype):
            logits = _crop_to_targets(model(batch["image"]), batch)
        loss, terms = hovernet_loss(logits, batch, config.weights)
        losses.append(float(loss))
        for name, value in terms.items():
            totals.setdefault(name, []).append(value)
    return float(np.mean(losses)), {name: float(np.mean(v)) for name, v in totals.items()}


def initialise_from(model: Network, path: Path) -> str:
    """Copy every tensor of checkpoint ``path`` whose name and shape fit ``model``; say what."""
    source = load_model(path).state_dict()
    target = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    if not fitting:
        raise CheckpointError(f"{path}: no tensor fits a {model.mode} HoVer-Net")
    model.load_state_dict(fitting, strict=False)
    left = [k for k in target if k not in fitting and not k.endswith("num_batches_tracked")]
    branches = sorted({".".join(k.split(".")[:2]) for k in left})
    fresh = f"; {len(left)} tensors start fresh ({', '.join(branches)})" if left else ""
    return f"initialised {len(fitting)} tensors from {path}{fresh}"


def _metadata(
    config: TrainConfig, step: int, stage: int, datasets: Sequence[LabelledSet]
) -> dict[str, Any]:
    tables = {ds.type_table for ds in datasets if ds.has_types}
    info: dict[str, Any] = {
        "training": {
            "step": step,
            "stage": stage,
            "steps": config.steps,
            "mode": config.mode,
            "nr_types": config.nr_types,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "data": [str(p) for p in config.data],
            "init": str(config.init) if config.init else None,
            "holdout": str(config.holdout) if config.holdout else None,
            "schedule": config.schedule_name,
            "lr": config.peak_lr,
            "input_size": config.window_sizes()[0],
            "loss_weights": asdict(config.weights),
            "data_weights": dict(config.data_weights),
        }
    }
    if config.nr_types is not None and len(tables) == 1 and None not in tables:
        info["type_table"] = tables.pop()
    return {"hoverdask": info}


def _save(
    model: Network,
    optimiser: torch.optim.Optimizer,
    config: TrainConfig,
    step: int,
    stage: int,
    datasets: Sequence[LabelledSet],
) -> None:
    save_checkpoint(model, config.out, extra=_metadata(config, step, stage, datasets))
    state = {"step": step, "stage": stage, "optimizer": optimiser.state_dict()}
    atomic_write(config.state_path, lambda tmp: torch.save(state, tmp))


def _load_resume(config: TrainConfig, model: Network) -> tuple[int, dict[str, Any]]:
    if not config.out.is_file() or not config.state_path.is_file():
        raise CheckpointError(
            f"cannot resume: {config.out} and {config.state_path} must both exist (written by "
            "an earlier run of hoverdask train with the same --out)"
        )
    saved = load_model(config.out)
    if (saved.mode, saved.nr_types) != (model.mode, model.nr_types):
        raise CheckpointError(
            f"cannot resume: {config.out} is {saved.mode} mode with nr_types={saved.nr_types}, "
            f"but this run asks for {model.mode} with nr_types={model.nr_types}"
        )
    model.load_state_dict(saved.state_dict())
    try:
        state = torch.load(config.state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"cannot read {config.state_path}: {err}") from None
    step = int(state["step"])
    recorded = saved.metadata.get("hoverdask", {}).get("training", {}).get("step")
    if recorded is not None and int(recorded) != step:
        raise CheckpointError(
            f"cannot resume: {config.out} is at step {recorded} but {config.state_path} at {step}"
        )
    return step, state


class _LogWriter:
    """CSV metrics log, flushed every row so it can be watched while training runs."""

    def __init__(self, path: Path, append: bool, resume_step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and path.is_file())
        if not fresh:
            _drop_rows_after(path, resume_step)
        self._handle = path.open("w" if fresh else "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=LOG_COLUMNS)
        if fresh:
            self._writer.writeheader()

    def write(self, log: StepLog) -> None:
        self._writer.writerow(log.row())
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Forget logged steps that the checkpoint being resumed does not contain."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
