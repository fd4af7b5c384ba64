"""The pruning losses: expected FLOPs, gate entropy and activation distillation.

* ``proportion``: expected FLOPs of the gated model under the gates' keep probabilities
  ``sigmoid(logits)``, over the original FLOPs. Each op's FLOPs are a product of the kept
  fractions of its input and output channels, so the proportion is differentiable in every
  logit that touches a counted op. With another budget (``ChannelPruning(budget=...)``,
  :mod:`.budgets`) "FLOPs" below reads as that budget's cost: parameters or latency.
* ``flops_loss``: ``w_flops * a(t) * (relu(r - 1) + below * relu(1 - r))`` with
  ``r = p_hard / target(t)``, where ``p_hard`` is the FLOPs share of the hard (eval-mode) gate
  decisions and the gradient is that of the expected share ``p`` (straight-through);
  where ``target(t)`` falls linearly from 1 to ``pruning_proportion`` over the first
  ``target_warmup`` share of the schedule, and ``a(t) = 1 - 0.1 ** (t / T)`` ramps the pruning
  pressure up. The two-sided term keeps the model from overshooting below the target, which
  costs accuracy without need.
* In the last ``freeze_fraction`` of the schedule (and at least on its last step, so that a
  short schedule still ends calibrated to the target) the gates are frozen at their hard
  decisions (train-mode forward passes use the hard masks too), so the weights and batch-norm
  statistics adapt to the model that :meth:`remove_channels` will cut out.
* ``entropy_loss``: ``w_entropy * a(t) * mean over groups of the mean binary entropy`` of the
  keep probabilities, pushing each gate to decide (0 or 1) so the hard model that
  ``remove_channels`` cuts out is the model that was trained.
* ``bkd_loss``: ``w_bkd * mean over mask sites of ||x * (1 - m)||^2 / ||x||^2``, the share of
  activation energy the gates remove at each consuming op (estimated on the first 4 samples of
  the batch): a distillation toward the unpruned activations that needs no second (teacher)
  forward pass, so the gated training step stays close to the plain step's cost. Where a
  consumer is a plain conv or linear layer the mask scales the smaller of its weight and its
  input. The loss terms of all gates and mask sites are computed together (a few tensor ops
  per step, not a few per gate).
* :func:`logit_distillation_loss`: the classic distillation from a teacher's logits (Hinton et
  al.), for training loops that can afford a forward pass of the unpruned model as a frozen
  teacher; it is not among the losses :class:`ChannelPruning` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.compare import may_hold_infinity, non_finite_tensors
from dagprune.errors import PruningError

from dagprune_algorithms.pruning.budgets import ExpectedCost, flops_cost
from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis

__all__ = ["PruningLossConfig", "ExpectedFlops", "NonFiniteLossWatch", "anneal", "binary_entropy",
           "removed_energy_share", "logit_distillation_loss", "failures_shared_by_processes",
           "non_finite_local_tensors"]


@dataclasses.dataclass
class PruningLossConfig:
    """Weights and schedule of the pruning losses (defaults tuned on small CNNs and ViTs)."""

    flops_weight: float = 10.0
    entropy_weight: float = 1.0
    bkd_weight: float = 0.1
    below_target_weight: float = 1.0
    target_warmup: float = 0.5
    entropy_floor: float = 0.01
    freeze_fraction: float = 0.15


def anneal(step: int, total_steps: int) -> float:
    """``1 - 0.1 ** (step / total_steps)``: 0 at the start, 0.9 at the end of the schedule."""
    return 1.0 - 0.1 ** (min(max(step, 0), total_steps) / total_steps)


def scheduled_target(step: int, total_steps: int, target: float, warmup: float) -> float:
    """The FLOPs target at ``step``: linear from 1 to ``target`` over ``warmup * total_steps``."""
    if warmup <= 0:
        return target
    progress = min(max(step, 0) / (warmup * total_steps), 1.0)
    return 1.0 - (1.0 - target) * progress


def binary_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli variables, elementwise."""
    p = probabilities.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log(p) + (1 - p) * torch.log1p(-p))


def removed_energy_share(sites) -> torch.Tensor | None:
    """Mean over mask sites of the share of activation energy their masks remove,
    ``||x * (1 - m)||^2 / ||x||^2``, from the energies the sites recorded in their latest
    train-mode forward pass (``channel_energy``, ``energy_mask``); None when none recorded.
    Differentiable in the masks; computed for all sites at once."""
    records = [(site.channel_energy, site.energy_mask) for site in sites
               if site.channel_energy is not None]
    if not records:
        return None
    energy = torch.cat([e.float() for e, _ in records])
    masks = torch.cat([m.float() for _, m in records])
    site_of = torch.repeat_interleave(torch.arange(len(records), device=energy.device),
                                      torch.tensor([e.numel() for e, _ in records], device=energy.device))
    zeros = energy.new_zeros(len(records))
    removed = zeros.index_add(0, site_of, energy * (1 - masks).square())
    total = zeros.index_add(0, site_of, energy)
    return (removed / total.clamp_min(1e-12)).mean()


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the samples.

    The ``T^2`` factor keeps the gradient's scale independent of ``T``. Computed in float32
    from log-softmaxes (finite for any finite logits, of any magnitude or dtype); classes the
    teacher gives probability 0 add nothing. No gradient reaches the teacher's logits. Nothing
    is read back from the device: a NaN or Inf in the logits gives a NaN loss, which the
    training loop's non-finite check reports.

    Args:
        student_logits, teacher_logits: ``(batch, classes)`` or ``(batch, ..., classes)``
            logits of the same shape; the last axis holds the classes.
        temperature: softens both distributions; a finite number > 0.

    Returns:
        A float32 scalar tensor.

    Raises:
        PruningError: the temperature is not a finite number > 0, or the shapes differ, or
            the logits are not floating point.

    >>> student = torch.tensor([[2.0, 0.0, -1.0]])
    >>> round(logit_distillation_loss(student, student.clone(), 2.0).item(), 6)
    0.0
    >>> teacher = torch.tensor([[1e4, 0.0, -float("inf")]])
    >>> logit_distillation_loss(torch.zeros(1, 3), teacher, 1.0).isfinite().item()
    True
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise PruningError(f"the distillation temperature must be a finite number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise PruningError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ in shape; distil from a teacher with "
                           "the same classes (the unpruned model)")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise PruningError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    classes = student_logits.shape[-1] if student_logits.ndim else 1
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    probabilities = teacher.exp()
    terms = torch.where(probabilities > 0, probabilities * (teacher - student), 0.0)  # 0 * log 0 = 0
    return terms.sum() / student.shape[0] * (temperature * temperature)


class ExpectedFlops(ExpectedCost):
    """Differentiable expected FLOPs share of a gated model: the :class:`.budgets.ExpectedCost`
    of the FLOPs budget of ``analysis``."""

    def __init__(self, analysis: ChannelAnalysis):
        super().__init__(flops_cost(analysis), analysis.prunable_groups)


class NonFiniteLossWatch:
    """Remembers, on the losses' device, the first step whose losses held a NaN or Inf.

    :meth:`record` runs every training step and never waits for the device (a few tiny tensor
    ops, no ``.item()``); :meth:`first_step` reads the answer, synchronising once, and is
    meant to be called every few hundred steps and at the end.

    >>> watch = NonFiniteLossWatch()
    >>> watch.record(0, torch.tensor(1.0), torch.tensor(2.0))
    >>> watch.record(1, torch.tensor(float("nan")), torch.tensor(2.0))
    >>> watch.record(2, torch.tensor(float("inf")), torch.tensor(2.0))
    >>> watch.first_step()
    1
    """

    def __init__(self):
        self._first_step: torch.Tensor | None = None  # -1 while every loss was finite

    def record(self, step: int, *losses: torch.Tensor) -> None:
        """Notes ``step`` if any of the scalar ``losses`` is NaN or Inf (no host synchronisation)."""
        with torch.no_grad():
            finite = torch.isfinite(torch.stack([loss.detach().float() for loss in losses])).all()
            if self._first_step is None:
                self._first_step = torch.full((), -1, dtype=torch.long, device=finite.device)
            self._first_step = self._first_step.to(finite.device)
            seen_before = self._first_step >= 0
            self._first_step = torch.where(finite | seen_before, self._first_step, step)

    def first_step(self) -> int | None:
        """The first recorded step with a non-finite loss, or None (reads it from the device)."""
        if self._first_step is None:
            return None
        step = int(self._first_step)
        return step if step >= 0 else None

    def check(self, during: str) -> None:
        """Raises :class:`PruningError` naming the first recorded step with a non-finite loss.

        >>> watch = NonFiniteLossWatch()
        >>> watch.record(4, torch.tensor(float("nan")))
        >>> watch.check("check_finite()")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        dagprune.errors.PruningError: check_finite(): the pruning losses were NaN or Inf at step 4 ...
        """
        step = self.first_step()
        if step is not None:
            raise PruningError(
                f"{during}: the pruning losses were NaN or Inf at step {step} while the gates, weights and "
                "statistics are finite; check the loss_config weights and the gate learning rate, "
                "and restart from the last good checkpoint")


def _local_values(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor, as FSDP's ``fully_shard`` makes of
    parameters), or ``tensor`` itself. No DTensor exists before its module is imported, so
    importing it here (0.6 s) is left to the code that shards."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def non_finite_local_tensors(module: nn.Module) -> list[str]:
    """:func:`dagprune.compare.non_finite_tensors` of ``module``, where a sharded parameter is
    checked on this process's shard (the other shards are other processes' to check: see
    :func:`failures_shared_by_processes`)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    if all(_local_values(tensor) is tensor for _, tensor in named):
        return non_finite_tensors(module)
    infinity_allowed = {id(tensor) for name, tensor in module.named_buffers() if may_hold_infinity(name)}
    floating = [(name, _local_values(tensor), id(tensor) in infinity_allowed) for name, tensor in named
                if tensor.is_floating_point()]
    with torch.no_grad():  # one read from the device for all tensors
        fine = torch.stack([(~torch.isnan(values).any() if may_hold_inf else torch.isfinite(values).all())
                            .to(floating[0][1].device) for _, values, may_hold_inf in floating])
    return [f"{name}: {'NaN' if may_hold_inf else 'NaN or Inf'} in this process's shard"
            for (name, _, may_hold_inf), ok in zip(floating, fine.tolist()) if not ok]


@contextlib.contextmanager
def failures_shared_by_processes(shared: bool, during: str) -> Iterator[None]:
    """Makes a :class:`PruningError` raised in the ``with`` block by one process of the default
    ``torch.distributed`` process group stop every process of it: the block's own error where it
    was raised, one naming the processes that raised elsewhere. A collective when ``shared``
    (every process must run the block); the block itself otherwise.

    Without it, a process whose own losses or shard hold a NaN stops alone, and the others fail
    later in their next collective (DistributedDataParallel's gradient all-reduce) with a
    communication error that does not say why, or wait there until the group's timeout.
    """
    if not shared:
        yield
        return
    try:
        yield
    except PruningError:
        _processes_that_failed(failed_here=True)
        raise
    failed = _processes_that_failed(failed_here=False)
    if failed:
        raise PruningError(f"{during}: process(es) {', '.join(map(str, failed))} found NaN or Inf (their error "
                           "names where); every process stops with them: restart from the last good checkpoint")


def _processes_that_failed(failed_here: bool) -> list[int]:
    """The ranks of the default process group that report a failure (a collective)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    failed[dist.get_rank()] = int(failed_here)
    dist.all_reduce(failed)
    return failed.nonzero().flatten().tolist()
