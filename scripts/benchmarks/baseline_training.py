"""The accuracy section's baseline: trained until its held-out accuracy stops improving.

Training runs in phases of falling learning rate (``lr``, then ``lr / 10``: Adam restarted from
the best weights of the phase before). In each phase the model is evaluated every
``eval_every`` steps on a *selection* split, images held out of the training set (never the
validation set the pruned models are reported on), and the phase ends when ``patience``
evaluations in a row brought no improvement of more than ``min_delta`` points over the best
accuracy so far, or at the phase's step cap. The weights with the best selection accuracy of
all phases are the baseline (``baseline.pt``, ``{"model": state_dict}``, as ``dagprune prune
--baseline-checkpoint`` reads it).

Everything is resumable: each phase checkpoints through
:func:`~dagprune_algorithms.app.training.train_steps` (whose batches are a function of the seed
and the step), and the curve is written to ``baseline_curve.json`` after every evaluation, so
a run stopped anywhere continues with the same result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from dagprune_algorithms.app.training import evaluate_accuracy, load_checkpoint, save_checkpoint, train_steps

from .common import log, write_json

PHASE_SEED_OFFSET = 10
"""Phase ``i`` draws its batches with seed ``seed + i * PHASE_SEED_OFFSET`` (phase 0: the seed)."""

LR_DECAY = 10.0
"""Each phase after the first trains at the learning rate of the one before divided by this."""


@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """When a phase has converged: ``patience`` evaluations, ``eval_every`` steps apart, without
    an improvement of more than ``min_delta`` points of selection accuracy over the best so far."""

    eval_every: int
    patience: int
    min_delta: float


def split_selection(train: tuple[torch.Tensor, torch.Tensor], size: int, seed: int):
    """``(training part, selection part)`` of ``train``: ``size`` images drawn with ``seed`` are
    held out for selection."""
    count = len(train[0])
    if not 0 < size < count:
        raise ValueError(f"selection split of {size} images out of {count} training images; give "
                         f"a size in 1..{count - 1}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    kept, held_out = order[size:].sort().values, order[:size].sort().values
    return (train[0][kept], train[1][kept]), (train[0][held_out], train[1][held_out])


def _resumed_state(path: Path, identity: dict) -> dict:
    if not path.exists():
        return {"identity": identity, "curve": [], "phases": []}
    state = json.loads(path.read_text())
    if state.get("identity") != identity:
        changed = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
        raise ValueError(f"{path} was written by a baseline run with other settings ({', '.join(changed)}); "
                         "give the benchmark another --work-dir")
    return state


def train_converged_baseline(model: torch.nn.Module, train, selection, val, *, lr: float, batch_size: int,
                             seed: int, phase_max_steps: list[int], rule: PlateauRule, folder: Path) -> dict:
    """Trains ``model`` in phases until its selection accuracy plateaus; see the module docstring.

    Args:
        model: the freshly initialised model (its weights become the baseline's).
        train, selection, val: ``(inputs, labels)`` tensors; ``val`` is evaluated once, on the
            chosen weights.
        lr, batch_size, seed: Adam's learning rate of the first phase, images per step, data seed.
        phase_max_steps: the step cap of each phase (its length is the number of phases).
        rule: the plateau rule.
        folder: where ``baseline.pt``, ``baseline_curve.json`` and the phase checkpoints go.

    Returns:
        ``{"checkpoint", "accuracy" (val, %), "selection_accuracy", "steps" (all phases),
        "best_step", "phases": [{"lr", "steps", "plateaued", "best_selection_accuracy"}],
        "curve": [{"phase", "step", "total_step", "lr", "selection_accuracy"}],
        "seconds_per_step"}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    curve_path, best_path = folder / "baseline_curve.json", folder / "baseline.pt"
    identity = {"lr": lr, "batch_size": batch_size, "seed": seed, "phase_max_steps": list(phase_max_steps),
                "rule": dataclasses.asdict(rule), "train_images": len(train[0]),
                "selection_images": len(selection[0])}
    state = _resumed_state(curve_path, identity)
    best = max(state["curve"], key=lambda r: r["selection_accuracy"], default=None)
    for index, max_steps in enumerate(phase_max_steps):
        if index < len(state["phases"]):
            continue  # finished before a restart
        phase_lr = lr / LR_DECAY ** index
        if best is not None:
            model.load_state_dict(load_checkpoint(best_path)["model"])
        phase = _train_phase(model, train, selection, phase_lr, batch_size, seed + index * PHASE_SEED_OFFSET,
                             max_steps, rule, folder / f"baseline_phase{index}.ckpt", index, state, best_path,
                             curve_path, steps_before=sum(p["steps"] for p in state["phases"]))
        state["phases"].append(phase)
        write_json(curve_path, state)
        best = max(state["curve"], key=lambda r: r["selection_accuracy"])
    model.load_state_dict(load_checkpoint(best_path)["model"])
    accuracy = evaluate_accuracy(model, *val)
    trained = [r for r in state["curve"] if r.get("seconds")]
    seconds_per_step = (sum(r["seconds"] for r in trained) / sum(r["trained_steps"] for r in trained)
                        if trained else None)
    return {"checkpoint": str(best_path), "accuracy": accuracy, "selection_accuracy": best["selection_accuracy"],
            "steps": sum(p["steps"] for p in state["phases"]), "best_step": best["total_step"],
            "phases": state["phases"], "curve": state["curve"], "seconds_per_step": seconds_per_step}


def _train_phase(model, train, selection, lr, batch_size, seed, max_steps, rule: PlateauRule, checkpoint: Path,
                 index: int, state: dict, best_path: Path, curve_path: Path, steps_before: int) -> dict:
    """One phase: evaluations every ``rule.eval_every`` steps until the plateau rule or the cap
    stops it; appends to ``state["curve"]`` (written after every evaluation) and saves a new best
    to ``best_path``. Returns the phase's summary."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    records = [r for r in state["curve"] if r["phase"] == index]
    overall_best = max((r["selection_accuracy"] for r in state["curve"]), default=float("-inf"))
    reference, since_improvement = _replay(state["curve"], index, rule)
    step = records[-1]["step"] if records else 0
    while True:
        end = min(step + rule.eval_every, max_steps)
        started = time.perf_counter()
        train_steps(model, optimizer, train, batch_size, seed, end, checkpoint_path=checkpoint)
        seconds = time.perf_counter() - started
        accuracy = evaluate_accuracy(model, *selection)
        record = {"phase": index, "step": end, "total_step": steps_before + end, "lr": lr,
                  "selection_accuracy": accuracy, "seconds": seconds, "trained_steps": end - step}
        state["curve"].append(record)
        if accuracy > overall_best:
            overall_best = accuracy
            save_checkpoint(best_path, {"model": model.state_dict()})
        if accuracy > reference + rule.min_delta:
            reference, since_improvement = accuracy, 0
        else:
            since_improvement += 1
        write_json(curve_path, state)
        log(f"baseline phase {index} (lr {lr:g}) step {end}: selection accuracy {accuracy:.2f}% "
            f"({since_improvement}/{rule.patience} without > {rule.min_delta} points; "
            f"{seconds / max(end - step, 1):.3f} s/step)")
        step = end
        plateaued = since_improvement >= rule.patience
        if plateaued or step >= max_steps:
            phase_records = [r for r in state["curve"] if r["phase"] == index]
            return {"lr": lr, "steps": step, "plateaued": plateaued,
                    "best_selection_accuracy": max(r["selection_accuracy"] for r in phase_records)}


def _replay(curve: list, index: int, rule: PlateauRule) -> tuple[float, int]:
    """The plateau rule's reference accuracy and count of evaluations without improvement after
    the records of the phases up to ``index`` (a phase starts from the best weights so far)."""
    reference = max((r["selection_accuracy"] for r in curve if r["phase"] < index), default=float("-inf"))
    since_improvement = 0
    for record in (r for r in curve if r["phase"] == index):
        if record["selection_accuracy"] > reference + rule.min_delta:
            reference, since_improvement = record["selection_accuracy"], 0
        else:
            since_improvement += 1
    return reference, since_improvement
