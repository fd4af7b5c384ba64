"""A small, exact-resume training engine used by ``dagprune prune`` and the benchmarks.

Batches are a pure function of ``(seed, step)`` (a fresh permutation per epoch), and
checkpoints hold the model and optimizer state, the step, the RNG states and the history, so a
run stopped at any checkpoint and resumed continues bit-exactly. Checkpoints are written
atomically and a run whose loss becomes NaN stops with :class:`TrainingError`, leaving the last
good checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dagprune.errors import DagpruneError
from dagprune.training_mode import evaluation_mode

__all__ = ["TrainingError", "batch_indices", "batches", "evaluate_accuracy", "save_checkpoint",
           "load_checkpoint", "plain_log_value", "train_steps", "materialize"]


class TrainingError(DagpruneError):
    """Training cannot continue (e.g. the loss became NaN)."""


def materialize(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a (small) data set as two tensors ``(inputs, labels)``."""
    inputs, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in inputs]), torch.as_tensor(labels)


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch used at ``step``: epoch ``e`` walks a permutation seeded by (seed, e)."""
    per_epoch = max(num_samples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size]


def batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
            start_step: int, end_step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields ``(step, x, y)`` for ``start_step <= step < end_step``."""
    for step in range(start_step, end_step):
        index = batch_indices(len(inputs), batch_size, seed, step)
        yield step, inputs[index], labels[index]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is restored)."""
    correct = 0
    with evaluation_mode(model):
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size].to(device)
            correct += (model(x).argmax(-1).cpu() == labels[start:start + batch_size]).sum().item()
    return 100.0 * correct / max(len(inputs), 1)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Writes ``state`` atomically (temporary file + fsync + rename): the previous checkpoint
    stays in place until the new one is complete.

    Raises:
        TrainingError: ``state`` holds something other than tensors and plain values (dict,
            list, tuple, str, int, float, bool, None), which ``torch.load(weights_only=True)``
            would refuse; nothing is written.
    """
    path = Path(path)
    _check_plain_state(state, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


_PLAIN_TYPES = (str, int, float, bool, type(None))
"""The exact types, besides tensors, that a checkpoint may hold (with dicts, lists and tuples)."""


def _check_plain_state(value, where: str) -> None:
    """Raises :class:`TrainingError` naming the first value of ``value`` that is neither a tensor
    nor a plain value (numpy scalars are the usual culprit)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TrainingError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}; "
                                    "use str or int keys")
            _check_plain_state(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain_state(item, f"{where}[{index}]")
    elif type(value) not in _PLAIN_TYPES and not isinstance(value, torch.Tensor):
        raise TrainingError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}, "
                            "which torch.load(weights_only=True) refuses; convert it to a Python "
                            "number or a tensor first")


def plain_log_value(value):
    """``value`` as a plain Python value for logs and checkpoints: numpy and 0-d tensor numbers
    become ``float``/``int``/``bool``; str and None are kept.

    >>> import numpy as np
    >>> plain_log_value(np.float64(0.5)), plain_log_value(torch.tensor(3)), plain_log_value(None)
    (0.5, 3, None)
    """
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return value.item()
    return value


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    Raises:
        TrainingError: the file is missing, corrupt, or holds other objects (the message says
            which and what to do).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        cause = cause.split(" was not an allowed global")[0]
        raise TrainingError(f"cannot read checkpoint {path} ({type(error).__name__}: {cause}); it must "
                            "hold only tensors and plain values: replace it, or delete it to redo "
                            "the phase that wrote it") from error


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class StepResult:
    """What a step function reports: the total loss to optimise and values to log.

    ``logs`` is a dict, or a function returning one, called only on logging steps (right after
    the step function, before the update): reading values back from the device then happens
    every ``log_every`` steps, not every step.
    """

    loss: torch.Tensor
    logs: dict | Callable[[], dict]


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--amp``: the autocast dtype of the forward pass and losses (fp16 also scales the loss)."""


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor],
                batch_size: int, seed: int, total_steps: int,
                step_fn: Callable[[int, torch.Tensor, torch.Tensor], StepResult] | None = None,
                checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
                device: str | torch.device = "cpu", progress: Callable | None = None,
                log_every: int = 10, history: list | None = None,
                on_log: Callable[[int, dict], dict] | None = None, amp: str = "none") -> list:
    """Trains for ``total_steps`` steps, resuming from ``checkpoint_path`` if it exists.

    Args:
        model, optimizer: what to train.
        data: ``(inputs, labels)`` tensors of the training set.
        step_fn: ``(step, x, y) -> StepResult``; default: cross-entropy of ``model(x)``.
        checkpoint_path, checkpoint_every: where and how often to checkpoint (0: only at end).
        progress: a tqdm-like callable wrapping the step iterator.
        history: list to append logs to every ``log_every`` steps (also checkpointed).
        on_log: ``(step, logs) -> extra logs`` called when logging (e.g. validation accuracy).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (see :data:`AMP_DTYPES`); fp16 uses a
            ``torch.amp.GradScaler``, whose state is checkpointed with the rest.

    Returns:
        The history list.

    Raises:
        TrainingError: the loss is not finite; the last good checkpoint is kept.
    """
    history = [] if history is None else history
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=amp == "fp16")
    start = _resume(checkpoint_path, model, optimizer, scaler, history)
    if step_fn is None:
        def step_fn(step, x, y):
            loss = F.cross_entropy(model(x), y)
            return StepResult(loss, lambda: {"task_loss": loss.item()})

    watch = _LossWatch()

    def checkpoint(step: int) -> None:
        watch.check(checkpoint_path)  # never checkpoint weights a non-finite loss updated
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scaler": scaler.state_dict(), "rng": _rng_state(),
                                              "step": step, "history": history})

    model.train()
    iterator = batches(*data, batch_size, seed, start, total_steps)
    if progress is not None:
        iterator = progress(iterator, total=total_steps, initial=start)
    for step, x, y in iterator:
        with torch.autocast(device_type, dtype=AMP_DTYPES[amp], enabled=amp != "none"):
            result = step_fn(step, x.to(device), y.to(device))
        watch.record(result.loss, step)
        logging = step % log_every == 0 or step == total_steps - 1
        if logging:
            watch.check(checkpoint_path)
            step_logs = result.logs() if callable(result.logs) else result.logs
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(result.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if logging:
            logs = {"step": step, **step_logs}
            if on_log is not None:
                logs.update(on_log(step, logs))
            history.append({key: plain_log_value(value) for key, value in logs.items()})
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            checkpoint(step + 1)
    if start < total_steps:
        checkpoint(total_steps)
    return history


def _resume(checkpoint_path, model, optimizer, scaler, history: list) -> int:
    """Restores the state of ``checkpoint_path`` if it exists; returns the step to start at."""
    if checkpoint_path is None or not Path(checkpoint_path).exists():
        return 0
    state = load_checkpoint(checkpoint_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    history[:] = state.get("history", [])
    return int(state["step"])


class _LossWatch:
    """Remembers on the loss's device the first step whose loss was NaN or Inf (no host sync);
    :meth:`check` reads it back."""

    def __init__(self):
        self.first_bad_step: torch.Tensor | None = None

    def record(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        unset = self.first_bad_step < 0
        self.first_bad_step = torch.where(bad & unset, torch.full_like(self.first_bad_step, step),
                                          self.first_bad_step)

    def check(self, checkpoint_path) -> None:
        """Raises :class:`TrainingError` if a recorded loss was not finite."""
        step = -1 if self.first_bad_step is None else int(self.first_bad_step)
        if step >= 0:
            raise TrainingError(
                f"the loss became NaN or Inf at step {step}; stopping. "
                + (f"The last good checkpoint is {checkpoint_path}. " if checkpoint_path else "")
                + "Lower the learning rate or the pruning loss weights.")
