"""The accuracy section of the Torch-Pruning benchmark: iterative pruning with training to a
FLOPs target, with the protocol of ``dagprune prune --method l1`` (see the module docstring of
``torch_pruning_bench.py``).

Imported by ``torch_pruning_bench.py``, which puts the repository and ``scripts/`` on
``sys.path`` first (the peer environment sees the main environment's site-packages, but
not its editable install).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from benchmarks.common import StageError, stage, write_json
from dagprune_algorithms.app.models import create_timm_model

FLOPS_TOLERANCE = 0.01
"""The ratio search stops once the FLOPs proportion is in ``[target - this, target]``."""

MAX_PRUNING_RATIO = 0.95
"""Upper end of the ratio search: at higher ratios local pruning empties small layers."""

RATIO_SEARCH_STEPS = 20
"""Most pruning trials per FLOPs target."""

RATIO_RESOLUTION = 1e-4
"""The search also stops when the ratio is known to this precision (channel counts are whole)."""


@dataclasses.dataclass(frozen=True)
class IterativeMethod:
    """A Torch-Pruning method of the accuracy section: its importance and pruner, as Torch-Pruning's
    own benchmark (``benchmarks/main.py``) pairs them; ``needs_gradients``: the importance reads
    the weights' ``.grad``."""

    importance: Callable[[], object]
    pruner: type
    needs_gradients: bool = False


ACCURACY_METHODS = {
    "magnitude": IterativeMethod(lambda: tp.importance.MagnitudeImportance(p=1), tp.pruner.BasePruner),
    "group_norm": IterativeMethod(lambda: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner),
    "taylor": IterativeMethod(lambda: tp.importance.TaylorImportance(), tp.pruner.BasePruner,
                              needs_gradients=True),
}
"""The accuracy section's methods: L1 magnitude, group L2 norm, first-order Taylor."""


def prune_by_magnitude(model: nn.Module, ratio: float, example_inputs: torch.Tensor) -> nn.Module:
    """One-shot local L1 magnitude pruning of ``model`` (in place) at channel ratio ``ratio``."""
    pruner = tp.pruner.BasePruner(model, example_inputs,
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, global_pruning=False, iterative_steps=1,
                                  ignored_layers=[model.get_classifier()])
    pruner.step()
    return model


@dataclasses.dataclass
class RatioSearch:
    """The pruned model closest to a FLOPs target from below, and how it was found."""

    ratio: float
    model: nn.Module
    flops_proportion: float
    trials: int


def search_pruning_ratio(baseline: nn.Module, target: float, example_inputs: torch.Tensor,
                         count_flops: Callable[[nn.Module], float] | None = None) -> RatioSearch:
    """Bisects the pruning ratio until the FLOPs proportion is in ``[target - 0.01, target]``.

    FLOPs are ``count_flops`` (default: ``tp.utils.count_ops_and_params``) of the pruned copy
    over the baseline's. The
    first trial is ``MAX_PRUNING_RATIO``, then the bisection of ``[0, MAX_PRUNING_RATIO]``; every
    trial prunes a fresh copy of ``baseline`` and a ratio whose pruning fails counts as too
    high. Without a hit within ``RATIO_SEARCH_STEPS`` trials (or once the ratio is bracketed to
    ``RATIO_RESOLUTION``) the closest proportion below the target is kept.

    Raises:
        ValueError: no trial reached the target.
    """
    if count_flops is None:
        count_flops = lambda model: tp.utils.count_ops_and_params(model, example_inputs)[0]  # noqa: E731
    original_flops = count_flops(baseline)
    low, high, ratio = 0.0, MAX_PRUNING_RATIO, MAX_PRUNING_RATIO
    best, failures, trials = None, [], 0
    for trials in range(1, RATIO_SEARCH_STEPS + 1):
        try:
            model = prune_by_magnitude(copy.deepcopy(baseline), ratio, example_inputs)
            proportion = count_flops(model) / original_flops
        except Exception as error:  # a ratio that breaks the model is beyond the usable range
            failures.append(f"ratio {ratio:.4f}: {type(error).__name__}: {error}")
            high = ratio
        else:
            if proportion > target:
                low = ratio
            else:
                best = RatioSearch(ratio, model, proportion, trials)
                high = ratio
                if target - proportion <= FLOPS_TOLERANCE:
                    break
        if best is not None and high - low < RATIO_RESOLUTION:
            break
        ratio = (low + high) / 2
    if best is None:
        raise ValueError(f"no pruning ratio up to {MAX_PRUNING_RATIO} reaches {target} of the "
                         f"FLOPs in {trials} trials" + (f"; {failures[0]}" if failures else ""))
    best.trials = trials
    return best


def cached_pruning_ratio(baseline: nn.Module, target: float, args, data: dict) -> dict:
    """``{"ratio", "flops_proportion", "trials"}`` of :func:`search_pruning_ratio`, read from
    ``--ratio-cache`` when it holds this model, input size and target.

    FLOPs are counted by ``dagprune.count_flops``, the counter the benchmark compares all tools
    with. Local pruning keeps ``int(channels * (1 - ratio))`` channels of every group whatever the
    importance or the number of iterative steps, so one ratio serves every method and seed.
    """
    key = f"{args.model}|{'x'.join(map(str, data['input_shape']))}|{target}|dagprune.count_flops"
    cache = {}
    if args.ratio_cache and Path(args.ratio_cache).exists():
        cache = json.loads(Path(args.ratio_cache).read_text())
    if key not in cache:
        search = search_pruning_ratio(baseline, target, data["example_inputs"],
                                      lambda model: _dagprune_flops(model, data["input_shape"]))
        cache[key] = {"ratio": search.ratio, "flops_proportion": search.flops_proportion,
                      "trials": search.trials}
        if args.ratio_cache:
            write_json(Path(args.ratio_cache), cache)
    return cache[key]


def _dagprune_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    import dagprune

    return dagprune.count_flops(dagprune.build_from_unstructured_module(model), input_shape).total


def empty_accuracy_row(method: str, target: float, seed: int) -> dict:
    """The fields of an accuracy row; accuracies are in percent, proportions are fractions,
    ``*_s_per_step`` are seconds per training step of the pruning and fine-tuning phases."""
    return {"method": method, "target": target, "seed": seed, "ratio": None, "prune_times": None,
            "step_epoch": None, "flops_proportion": None, "dagprune_flops_proportion": None, "params": None,
            "accuracy_before_finetune": None, "accuracy": None, "baseline_accuracy": None,
            "search_trials": None, "pruning_s_per_step": None, "finetune_s_per_step": None,
            "conversion_difference": None, "pruned_path": None, "seconds": None, "error": None}


def _train_step(model: nn.Module, optimizer, train: tuple, batch_size: int, seed: int, step: int,
                gradient_sums: dict | None = None) -> None:
    """One Adam step on cross-entropy over the batch ``dagprune prune`` uses at ``step``
    (``batch_indices``); with ``gradient_sums``, each parameter's gradient is added to its sum."""
    from dagprune_algorithms.app.training import batch_indices

    index = batch_indices(len(train[0]), batch_size, seed, step)
    model.train()
    loss = F.cross_entropy(model(train[0][index]), train[1][index])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if gradient_sums is not None:
        for parameter in model.parameters():
            if parameter.grad is not None:
                total = gradient_sums.get(parameter)
                gradient_sums[parameter] = parameter.grad.clone() if total is None else total + parameter.grad
    optimizer.step()


def prune_iteratively(baseline: nn.Module, method_name: str, ratio: float, args, data: dict,
                      row: dict) -> nn.Module:
    """A copy of ``baseline`` trained ``--steps`` steps at ``--lr`` while Torch-Pruning prunes it
    ``--prune-times`` times, every ``--step-epoch`` steps from step 0 (after that step's update;
    the schedule of ``dagprune prune --method l1``), to channel ratio ``ratio``; then
    ``--finetune-steps`` steps at ``--lr / 10``. Adam starts afresh after every prune (the pruned
    parameters are new tensors). The Taylor importance reads the gradients summed over the steps
    since the previous prune (step 0: its own batch)."""
    method = ACCURACY_METHODS[method_name]
    model = copy.deepcopy(baseline)
    with stage("pruner"):
        pruner = method.pruner(model, data["example_inputs"], importance=method.importance(),
                               pruning_ratio=ratio, global_pruning=False, iterative_steps=args.prune_times,
                               ignored_layers=[model.get_classifier()])
    gradient_sums = {} if method.needs_gradients else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    started = time.perf_counter()
    with stage("pruning"):
        for step in range(args.steps):
            _train_step(model, optimizer, data["train"], args.batch_size, args.seed + 1, step, gradient_sums)
            if step % args.step_epoch == 0 and pruner.current_step < args.prune_times:
                if gradient_sums is not None:
                    for parameter in model.parameters():
                        parameter.grad = gradient_sums.get(parameter)
                    gradient_sums.clear()
                pruner.step()
                optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        if pruner.current_step < args.prune_times:
            raise ValueError(f"{pruner.current_step} of {args.prune_times} prunes done in {args.steps} steps")
    row["pruning_s_per_step"] = (time.perf_counter() - started) / max(args.steps, 1)
    with stage("evaluation"):
        from dagprune_algorithms.app.training import evaluate_accuracy

        row["accuracy_before_finetune"] = evaluate_accuracy(model, *data["val"])
    started = time.perf_counter()
    with stage("fine-tuning"):
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr / 10)
        for step in range(args.finetune_steps):
            _train_step(model, optimizer, data["train"], args.batch_size, args.seed + 2, step)
    row["finetune_s_per_step"] = (time.perf_counter() - started) / max(args.finetune_steps, 1)
    return model.eval()


def save_as_dag(model: nn.Module, input_shape: tuple[int, ...], folder: Path) -> float:
    """Saves ``model`` as a dagprune DAG in ``folder`` (loadable with ``dagprune.load_dag``, so
    every tool's pruned model is timed and evaluated alike); returns the largest relative
    difference between the DAG and the model."""
    import dagprune

    dag = dagprune.build_from_unstructured_module(model)
    difference = dagprune.compare_module_outputs(model, dag, (2, *input_shape), raise_error=False)
    dag.save(folder)
    return float(difference)


def accuracy_row(baseline: nn.Module, method: str, target: float, args, data: dict) -> dict:
    """One method at one target: ratio (cached search), iterative pruning with training,
    fine-tuning, evaluation; the pruned model is saved as a DAG under ``--work-dir``."""
    from dagprune_algorithms.app.training import evaluate_accuracy

    started = time.perf_counter()
    row = empty_accuracy_row(method, target, args.seed)
    row.update(baseline_accuracy=data["baseline_accuracy"], prune_times=args.prune_times,
               step_epoch=args.step_epoch)
    folder = Path(args.work_dir) / f"tp_{method}_{target}"
    try:
        with stage("ratio search"):
            found = cached_pruning_ratio(baseline, target, args, data)
        row.update(ratio=found["ratio"], search_trials=found["trials"])
        model = prune_iteratively(baseline, method, found["ratio"], args, data, row)
        with stage("flops"):
            row["flops_proportion"] = (tp.utils.count_ops_and_params(model, data["example_inputs"])[0]
                                       / data["tp_flops"])
            row["dagprune_flops_proportion"] = _dagprune_flops(model, data["input_shape"]) / data["dagprune_flops"]
            row["params"] = sum(p.numel() for p in model.parameters())
        with stage("evaluation"):
            row["accuracy"] = evaluate_accuracy(model, *data["val"])
        with stage("save"):
            row["conversion_difference"] = save_as_dag(model, data["input_shape"], folder / "pruned")
            row["pruned_path"] = str(folder / "pruned")
    except StageError as error:
        row["error"] = str(error)
    row["seconds"] = time.perf_counter() - started
    return row


def load_baseline(args) -> tuple[nn.Module, dict]:
    """The baseline model and what every target shares: data, example input, accuracy, FLOPs."""
    from dagprune_algorithms.app.data import load_dataset
    from dagprune_algorithms.app.training import evaluate_accuracy, load_checkpoint, materialize

    with stage("data"):
        split = load_dataset(args.data_dir, image_size=args.image_size, seed=args.seed,
                             limit_val=args.limit_val)
        train, val = materialize(split.train), materialize(split.val)
        input_shape = tuple(split.input_shape)
    with stage("baseline"):
        torch.manual_seed(args.seed)
        model = create_timm_model(args.model, input_shape, num_classes=split.num_classes)
        state = load_checkpoint(args.baseline_checkpoint)
        model.load_state_dict(state.get("model", state))
        model.eval()
        baseline_accuracy = evaluate_accuracy(model, *val)
    example_inputs = torch.zeros(1, *input_shape)
    with stage("flops"):
        tp_flops = tp.utils.count_ops_and_params(model, example_inputs)[0]
        dagprune_flops = _dagprune_flops(model, input_shape)
    return model, {"train": train, "val": val, "input_shape": input_shape, "example_inputs": example_inputs,
                   "baseline_accuracy": baseline_accuracy, "tp_flops": tp_flops,
                   "dagprune_flops": dagprune_flops}


ROW_ARGUMENTS = ("model", "image_size", "data_dir", "baseline_checkpoint", "seed", "steps", "finetune_steps",
                 "batch_size", "lr", "prune_times", "step_epoch", "limit_val")
"""The arguments a saved row depends on: a row saved with others is computed again."""


def accuracy_rows(args):
    """Yields the accuracy section's rows, one per method and target; a row already saved in
    ``--work-dir`` by a run with the same arguments is read back instead of computed again."""
    settings = {name: getattr(args, name) for name in ROW_ARGUMENTS}
    pending = []
    for method in args.methods:
        for target in args.targets:
            saved = Path(args.work_dir) / f"tp_{method}_{target}" / "row.json"
            if saved.exists():
                stored = json.loads(saved.read_text())
                if stored.get("settings") == settings and not stored["row"].get("error"):
                    yield stored["row"]
                    continue
            pending.append((method, target, saved))
    if not pending:
        return
    try:
        baseline, data = load_baseline(args)
    except StageError as error:
        for method, target, _ in pending:
            yield {**empty_accuracy_row(method, target, args.seed), "error": str(error)}
        return
    for method, target, saved in pending:
        row = accuracy_row(baseline, method, target, args, data)
        write_json(saved, {"settings": settings, "row": row})
        yield row
