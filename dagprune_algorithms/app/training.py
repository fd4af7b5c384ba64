"""A small, exact-resume training engine used by ``dagprune prune`` and the benchmarks.

Batches are a pure function of ``(seed, step)`` (a fresh permutation per epoch), and
checkpoints hold the model and optimizer state, the step, the RNG states and the history, so a
run stopped at any checkpoint and resumed continues bit-exactly. Checkpoints are written
atomically and a run whose loss becomes NaN stops with :class:`TrainingError`, leaving the last
good checkpoint in place. A step may accumulate the gradients of several micro-batches and run
on several processes (:class:`~dagprune_algorithms.app.distributed.Ranks`): its batch is then
shared out among them, and they stay alike (see :func:`train_steps`); a model sharded over them
(``--fsdp``) is checkpointed gathered, as an unsharded run would hold it.
"""

from __future__ import annotations

import contextlib
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

from dagprune_algorithms.app.distributed import (SINGLE_PROCESS, Ranks, gathered_state, load_gathered_state,
                                                  no_gradient_sync, unsharded_parameters)

__all__ = ["TrainingError", "batch_indices", "batches", "evaluate_accuracy", "save_checkpoint",
           "load_checkpoint", "plain_log_value", "train_steps", "materialize"]


class TrainingError(DagpruneError):
    """Training cannot continue (e.g. the loss became NaN)."""


def materialize(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a (small) data set as two tensors ``(inputs, labels)``."""
    inputs, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in inputs]), torch.as_tensor(labels)


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int, part: int = 0,
                  parts: int = 1) -> torch.Tensor:
    """Indices of the batch used at ``step``: epoch ``e`` walks a permutation seeded by (seed, e).

    With ``parts`` > 1, the batch of ``batch_size`` is shared out: part ``p`` is every
    ``parts``-th index of it from position ``p``, so the parts together are the batch (as
    ``DistributedSampler`` with ``set_epoch(e)`` shares out an epoch, without padding).

    >>> batch_indices(8, 4, seed=0, step=0).tolist()
    [4, 0, 7, 3]
    >>> batch_indices(8, 4, seed=0, step=0, part=0, parts=2).tolist(), batch_indices(8, 4, 0, 0, 1, 2).tolist()
    ([4, 7], [0, 3])
    """
    per_epoch = max(num_samples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size][part::parts]


def batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
            start_step: int, end_step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields ``(step, x, y)`` for ``start_step <= step < end_step``."""
    for step in range(start_step, end_step):
        index = batch_indices(len(inputs), batch_size, seed, step)
        yield step, inputs[index], labels[index]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256, device: str | torch.device = "cpu",
                      ranks: Ranks = SINGLE_PROCESS) -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is restored).

    With several ``ranks``, each evaluates every ``world_size``-th sample and the counts of
    correct predictions are summed: every sample is counted exactly once, and every rank gets
    the result. Every rank runs the same number of forward passes (one whose share is used up
    runs a sample it does not count), since those of a sharded model are collectives. Pass the
    model itself, not its DistributedDataParallel.
    """
    correct = 0
    shard = slice(ranks.rank, None, ranks.world_size)
    own_inputs, own_labels = inputs[shard], labels[shard]
    with evaluation_mode(model):
        for start in range(0, -(-len(inputs) // ranks.world_size), batch_size):
            x, y = own_inputs[start:start + batch_size], own_labels[start:start + batch_size]
            predictions = model((x if len(x) else inputs[:1]).to(device)).argmax(-1).cpu()
            correct += (predictions[:len(y)] == y).sum().item()
    return 100.0 * ranks.sum(correct) / max(len(inputs), 1)


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
                on_log: Callable[[int, dict], dict] | None = None, amp: str = "none", grad_accum: int = 1,
                ranks: Ranks = SINGLE_PROCESS, ddp_model: nn.Module | None = None,
                before_step: Callable[[int], None] | None = None,
                after_step: Callable[[int], None] | None = None) -> list:
    """Trains for ``total_steps`` optimizer steps, resuming from ``checkpoint_path`` if it exists.

    Args:
        model, optimizer: what to train (``model`` itself, not a DistributedDataParallel: its
            state is what is checkpointed; a sharded model's, gathered).
        data: ``(inputs, labels)`` tensors of the training set.
        batch_size: images of one micro-batch of one process. A step trains on
            ``batch_size * grad_accum * ranks.world_size`` images: the batch of that size that
            one process without accumulation would use, shared out by :func:`batch_indices`.
        step_fn: ``(step, x, y) -> StepResult``, called once per micro-batch; default:
            cross-entropy of ``ddp_model(x)``.
        checkpoint_path, checkpoint_every: where and how often (in steps) to checkpoint (0:
            only at the end).
        progress: a tqdm-like callable wrapping the step iterator.
        history: list to append logs to every ``log_every`` steps (also checkpointed).
        on_log: ``(step, logs) -> extra logs`` called when logging (e.g. validation accuracy).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (see :data:`AMP_DTYPES`); fp16 uses a
            ``torch.amp.GradScaler``, whose state is checkpointed with the rest.
        grad_accum: micro-batches per optimizer step: each one's loss is divided by it, so
            the step follows the mean gradient of all its images.
        ranks: the processes training together. Each trains on its part of every batch, a
            non-finite loss on any of them stops all, rank 0's buffers are copied to every rank
            before ``on_log``, checkpoints and the end, and rank 0 alone writes the
            checkpoint, which holds every rank's RNG state.
        ddp_model: the DistributedDataParallel that ``step_fn`` calls (``model`` or a part of
            it), or the sharded ``model`` itself: its gradient reduction is skipped on all
            micro-batches of a step but the last; the parameters a sharded model holds whole
            (the gates) have their gradients averaged before each update. Default with several
            ranks: ``model`` wrapped by ``ranks``.
        before_step, after_step: ``(step) -> None`` called once per step, before its first
            micro-batch and after its update (before logging and checkpointing).

    Returns:
        The history list.

    Raises:
        TrainingError: the loss is not finite (the last good checkpoint is kept), or the
            arguments cannot work together (the message says which).
    """
    loop = _TrainingLoop(model, optimizer, data, batch_size, seed, total_steps, step_fn, checkpoint_path,
                         checkpoint_every, torch.device(device), log_every, [] if history is None else history,
                         on_log, amp, grad_accum, ranks, ddp_model, before_step, after_step)
    return loop.run(progress)


@dataclasses.dataclass
class _TrainingLoop:
    """The arguments and the state of one :func:`train_steps` call."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: tuple[torch.Tensor, torch.Tensor]
    batch_size: int
    seed: int
    total_steps: int
    step_fn: Callable | None
    checkpoint_path: str | os.PathLike | None
    checkpoint_every: int
    device: torch.device
    log_every: int
    history: list
    on_log: Callable | None
    amp: str
    grad_accum: int
    ranks: Ranks
    ddp_model: nn.Module | None
    before_step: Callable | None
    after_step: Callable | None

    def __post_init__(self):
        self._check_arguments()
        if self.ddp_model is None and self.ranks.distributed:
            self.ddp_model = self.ranks.wrap(self.model, example_inputs=self.data[0][:2].to(self.device))
        self.unsharded = unsharded_parameters(self.ddp_model)
        if self.step_fn is None:
            self.step_fn = self._cross_entropy_step
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.watch = _LossWatch()

    def _check_arguments(self) -> None:
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise TrainingError(f"grad_accum must be an int >= 1 (micro-batches per step), got {self.grad_accum!r}")
        if self.ranks.distributed and self.step_fn is not None and self.ddp_model is None:
            raise TrainingError("with several processes, pass as ddp_model the DistributedDataParallel that "
                                "step_fn calls, so that the gradients are averaged over the processes")
        parts = self.grad_accum * self.ranks.world_size
        if parts > 1 and self.batch_size * parts > len(self.data[0]):
            raise TrainingError(f"a step needs batch size {self.batch_size} x {self.grad_accum} micro-batches x "
                                f"{self.ranks.world_size} processes = {self.batch_size * parts} images, more than "
                                f"the {len(self.data[0])} training images; lower the batch size or the "
                                "accumulation")

    def _cross_entropy_step(self, step, x, y) -> StepResult:
        loss = F.cross_entropy((self.model if self.ddp_model is None else self.ddp_model)(x), y)
        return StepResult(loss, lambda: {"task_loss": loss.item()})

    def run(self, progress) -> list:
        start = _resume(self.checkpoint_path, self.model, self.optimizer, self.scaler, self.history, self.ranks)
        self.model.train()
        steps = range(start, self.total_steps)
        if progress is not None:
            steps = progress(steps, total=self.total_steps, initial=start)
        for step in steps:
            self._train_step(step)
            if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and step + 1 < self.total_steps:
                self._checkpoint(step + 1)
        if start < self.total_steps:
            self._checkpoint(self.total_steps)
        return self.history

    def _train_step(self, step: int) -> None:
        if self.before_step is not None:
            self.before_step(step)
        logging = step % self.log_every == 0 or step == self.total_steps - 1
        step_logs = self._accumulate_gradients(step, logging)
        self.ranks.average_gradients(self.unsharded)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step(step)
        if logging:
            logs = {"step": step, **step_logs}
            if self.on_log is not None:
                self.ranks.broadcast_buffers(self.model)  # every rank evaluates the same model
                logs.update(self.on_log(step, logs))
            self.history.append({key: plain_log_value(value) for key, value in logs.items()})

    def _accumulate_gradients(self, step: int, logging: bool) -> dict | None:
        """Runs the step's micro-batches forward and backward; returns the logs of the last one
        on logging steps (read before the update)."""
        step_logs = None
        parts = self.grad_accum * self.ranks.world_size
        for micro in range(self.grad_accum):
            index = batch_indices(len(self.data[0]), self.batch_size * parts, self.seed, step,
                                  micro * self.ranks.world_size + self.ranks.rank, parts)
            x, y = self.data[0][index].to(self.device), self.data[1][index].to(self.device)
            last = micro == self.grad_accum - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.ddp_model):
                with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp], enabled=self.amp != "none"):
                    result = self.step_fn(step, x, y)
                self.watch.record(result.loss, step)
                if logging and last:
                    self.watch.check(self.checkpoint_path, self.ranks)
                    step_logs = result.logs() if callable(result.logs) else result.logs
                if micro == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                loss = result.loss if self.grad_accum == 1 else result.loss / self.grad_accum
                self.scaler.scale(loss).backward()
        return step_logs

    def _checkpoint(self, step: int) -> None:
        """Checks the losses, makes the buffers of every rank rank 0's, and (rank 0) writes the
        checkpoint of ``step``; every rank waits until it is written."""
        self.watch.check(self.checkpoint_path, self.ranks)  # never checkpoint weights a non-finite loss updated
        self.ranks.broadcast_buffers(self.model)
        if self.checkpoint_path is None:
            return
        rng_by_rank = self.ranks.gather(_rng_state())
        model_state = gathered_state(self.model.state_dict())  # every rank: gathering shards is a collective
        optimizer_state = gathered_state(self.optimizer.state_dict())
        if self.ranks.is_main:
            state = {"model": model_state, "optimizer": optimizer_state,
                     "scaler": self.scaler.state_dict(), "rng": rng_by_rank[0], "step": step,
                     "history": self.history}
            if self.ranks.distributed:
                state["rng_by_rank"] = rng_by_rank
            save_checkpoint(self.checkpoint_path, state)
        self.ranks.barrier()


def _resume(checkpoint_path, model, optimizer, scaler, history: list, ranks: Ranks) -> int:
    """Restores the state of ``checkpoint_path`` if it exists (every rank reads the same file,
    keeps its shard of a sharded model, and takes its own RNG state from it); returns the step
    to start at."""
    if checkpoint_path is None or not Path(checkpoint_path).exists():
        return 0
    state = load_checkpoint(checkpoint_path)
    load_gathered_state(model, optimizer, state["model"], state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_by_rank = state.get("rng_by_rank") or [state["rng"]]
    _set_rng_state(rng_by_rank[ranks.rank] if ranks.rank < len(rng_by_rank) else state["rng"])
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

    def check(self, checkpoint_path, ranks: Ranks = SINGLE_PROCESS) -> None:
        """Raises :class:`TrainingError` if a recorded loss was not finite, on any rank (the
        earliest such step of all ranks is named, so every rank stops alike)."""
        never = torch.iinfo(torch.long).max
        first = torch.full((), never, dtype=torch.long, device=ranks.device) if self.first_bad_step is None \
            else torch.where(self.first_bad_step < 0, never, self.first_bad_step)
        step = int(ranks.min_(first.to(ranks.device)))
        if step != never:
            raise TrainingError(
                f"the loss became NaN or Inf at step {step}; stopping. "
                + (f"The last good checkpoint is {checkpoint_path}. " if checkpoint_path else "")
                + "Lower the learning rate or the pruning loss weights.")
