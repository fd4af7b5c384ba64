"""``dagprune prune --distill``: logit distillation from the unpruned model while pruning and
fine-tuning.

The teacher is a frozen copy of the unpruned DAG taken before pruning starts (pruning trains
the model's weights in place), kept in eval mode and on the training device; every step runs it
once on the batch without gradients. The loss is
:func:`~dagprune_algorithms.pruning.losses.logit_distillation_loss` times ``--distill-weight``,
added to the task loss.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dagprune_algorithms.app.training import StepResult
from dagprune_algorithms.pruning.losses import logit_distillation_loss

__all__ = ["Distiller", "distillation_enabled", "make_distiller", "distillation_loss", "distillation_logs",
           "supervised_step"]


@dataclasses.dataclass
class Distiller:
    """A frozen teacher and the settings of the distillation loss."""

    teacher: nn.Module
    temperature: float
    weight: float

    def loss(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``weight * logit_distillation_loss(student_logits, teacher(x), temperature)``."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.weight * logit_distillation_loss(student_logits, teacher_logits, self.temperature)


def distillation_enabled(args) -> bool:
    """Whether the run distils from the unpruned model (``--distill``; auto: with ``--checkpoint``)."""
    return args.distill == "on" or (args.distill == "auto" and getattr(args, "checkpoint", None) is not None)


def make_distiller(args, model: nn.Module, device: torch.device) -> Distiller | None:
    """A :class:`Distiller` whose teacher is a frozen copy of ``model`` (None when ``--distill``
    is off, or auto without ``--checkpoint``)."""
    if not distillation_enabled(args):
        return None
    teacher = copy.deepcopy(model).to(device).eval()
    teacher.requires_grad_(False)
    return Distiller(teacher, args.distill_temperature, args.distill_weight)


def distillation_loss(distiller: Distiller | None, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weighted distillation loss, or a zero scalar without a distiller."""
    if distiller is None:
        return student_logits.new_zeros((), dtype=torch.float32)
    return distiller.loss(student_logits, x)


def distillation_logs(distiller: Distiller | None, loss: torch.Tensor) -> dict:
    """``{"distill_loss": value}`` for the history (empty without a distiller); reads the device."""
    return {} if distiller is None else {"distill_loss": loss.item()}


def supervised_step(model: nn.Module, distiller: Distiller | None) -> Callable:
    """The step function of plain training: cross-entropy of ``model(x)``, plus distillation."""
    def step(step: int, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = model(x)
        task_loss = F.cross_entropy(logits, y)
        distill_loss = distillation_loss(distiller, logits, x)
        return StepResult(task_loss + distill_loss, lambda: {"task_loss": task_loss.item(),
                                                             **distillation_logs(distiller, distill_loss)})
    return step
