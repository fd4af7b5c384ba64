"""How long the accuracy section will take: seconds per training step of each model it trains,
measured here, and the section's wall time estimated from them for given budgets.

Measured in alternation (rounds of ``--steps-per-round`` steps of each model in turn, median
over rounds, so load from other processes hits all alike), batch ``--batch-size`` at 32 px,
Adam, at each ``--threads``: the baseline's step, the gated step of ``--method dag`` (pruning
losses included) with and without the distillation teacher's forward, the step of the model
pruned to each target (fine-tuning; Torch-Pruning's pruning phase shrinks from the baseline's
step to it), and the evaluation per image. Run it where the benchmark will run::

    python scripts/benchmarks/accuracy_sizing.py --threads 1 2

The estimate counts, per seed: the baseline at its expected length, then per target four
dagprune runs (gated or masked steps during pruning, pruned steps during fine-tuning, the
job's evaluations every 100 pruning steps and 3 more, a fixed cost per run for data loading,
conversion and latency timing) and three Torch-Pruning runs (two evaluations each), then the
last measurement stage. ``--budget latency`` measures its latency table once (one more fixed
cost).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dagprune_algorithms.app.models import as_dag, create_timm_model
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.iterative import plan_iterative_pruning

RUN_OVERHEAD_S = 12.0
"""Seconds of a run outside its steps and evaluations at one thread: reading the data (about 5 s
per process for Fashion-MNIST), conversion and its check, pruning setup, latency timing (a
`dagprune prune` run of resnet18 with 1 + 1 steps took 6 to 11 s). Divided by the thread
speed-up of the baseline step at more threads."""

LATENCY_TABLE_S = 15.0
"""Seconds to measure ``--budget latency``'s table (resnet18 at 32 px, batch 32: about 4 s, up to
three times)."""


def _slim(dag, input_shape, target: float):
    pruning = ChannelPruning(dag, input_shape, target, 1000, initial_importance="l1")
    pruning.prepare_for_pruning().eval()
    pruning.calibrate_to_target()
    return pruning.remove_channels()


def _plain_step(model, x, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _gated_step(dag, input_shape, x, y, teacher=None):
    pruning = ChannelPruning(dag, input_shape, 0.5, 10_000)
    gated = pruning.prepare_for_pruning().train()
    optimizer = torch.optim.Adam(gated.parameters(), lr=2e-3)
    counter = [0]

    def step():
        logits = gated(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = loss + F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(teacher_logits / 2, -1),
                                   reduction="batchmean")
        _, flops_loss, entropy_loss, bkd_loss = pruning.compute_current_proportion_and_pruning_losses(
            global_step=counter[0])
        counter[0] += 1
        optimizer.zero_grad(set_to_none=True)
        (loss + flops_loss + entropy_loss + bkd_loss).backward()
        optimizer.step()
    return step


def _masked_step(dag, input_shape, x, y):
    """The step of ``--method l1``: the masked model after its first prune."""
    plan = plan_iterative_pruning(dag, input_shape, prune_times=5, step_epoch=1, target=0.5)
    algorithm = plan.create_algorithm().train()
    algorithm.maybe_prune(0)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=2e-3)

    def step():
        loss = F.cross_entropy(algorithm.architecture(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure_step_seconds(args, threads: int) -> dict:
    """Median seconds per step of each model (and per evaluated image) at ``threads``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    input_shape = (3, args.image_size, args.image_size)
    model = create_timm_model(args.model, input_shape, num_classes=10)
    x = torch.randn(args.batch_size, *input_shape)
    y = torch.randint(0, 10, (args.batch_size,))
    teacher = as_dag(create_timm_model(args.model, input_shape, num_classes=10)).eval()
    steps = {"baseline": _plain_step(model, x, y),
             "gated": _gated_step(as_dag(model), input_shape, x, y),
             "gated+distill": _gated_step(as_dag(model), input_shape, x, y, teacher),
             "masked (l1)": _masked_step(as_dag(model), input_shape, x, y)}
    for target in args.targets:
        steps[f"pruned {target}"] = _plain_step(_slim(as_dag(model).eval(), input_shape, target).train(), x, y)
    evaluation = torch.randn(256, *input_shape)

    def evaluate():
        with torch.no_grad():
            teacher(evaluation)
    steps["eval per image"] = evaluate
    times = {name: [] for name in steps}
    for round_index in range(args.rounds + 1):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            if round_index:  # the first round warms up
                per_call = (time.perf_counter() - started) / args.steps_per_round
                times[name].append(per_call / (256 if name == "eval per image" else 1))
    return {name: statistics.median(values) for name, values in times.items()}


def estimate_seconds(seconds: dict, args) -> dict:
    """The section's wall time by part (all seeds), from per-step ``seconds`` and the budgets of
    ``args``."""
    speedup = seconds["baseline_1t"] / seconds["baseline"] if "baseline_1t" in seconds else 1.0
    overhead = RUN_OVERHEAD_S / speedup
    per_image = seconds["eval per image"]
    evals = (math.ceil(args.steps / 100) + 1 + 3) * args.val_images * per_image
    baseline = (args.baseline_steps * seconds["baseline"]
                + args.baseline_steps / args.eval_every * args.selection_images * per_image
                + args.val_images * per_image + overhead)
    runs = 0.0
    for target in args.targets:
        pruned = seconds[f"pruned {target}"]
        teacher = per_image * args.batch_size
        dag = args.steps * seconds["gated"] + args.finetune_steps * pruned + evals + overhead
        distilled = (args.steps * seconds["gated+distill"] + args.finetune_steps * (pruned + teacher)
                     + evals + overhead)
        torch_pruning = (args.steps * (seconds["baseline"] + pruned) / 2 + args.finetune_steps * pruned
                         + 2 * args.val_images * per_image + overhead / 2)
        l1 = args.steps * seconds["masked (l1)"] + args.finetune_steps * pruned + evals + overhead
        runs += dag + 2 * distilled + l1 + 3 * torch_pruning  # dag, distill, latency budget, l1; 3 TP
    measuring = (7 * len(args.targets) + 1) * (args.val_images * per_image + 3)
    parts = {"baselines": args.seeds * baseline, "pruning runs": args.seeds * runs + LATENCY_TABLE_S / speedup,
             "measuring": args.seeds * measuring}
    return {**parts, "total": sum(parts.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=5)
    budgets = parser.add_argument_group("budgets of the estimate (the benchmark's --acc-* options)")
    budgets.add_argument("--seeds", type=int, default=3)
    budgets.add_argument("--baseline-steps", type=int, default=5000,
                         help="expected baseline length, both phases (the caps bound it)")
    budgets.add_argument("--eval-every", type=int, default=400)
    budgets.add_argument("--selection-images", type=int, default=5000)
    budgets.add_argument("--val-images", type=int, default=10000)
    budgets.add_argument("--steps", type=int, default=300)
    budgets.add_argument("--finetune-steps", type=int, default=200)
    args = parser.parse_args(argv)
    single = None
    for threads in sorted(args.threads):
        seconds = measure_step_seconds(args, threads)
        if threads == 1:
            single = seconds["baseline"]
        if single is not None:
            seconds["baseline_1t"] = single
        print(f"{threads} thread(s): " + ", ".join(f"{name} {value:.4f} s" for name, value in seconds.items()
                                                   if name != "baseline_1t"))
        estimate = estimate_seconds(seconds, args)
        print(f"  estimate for {args.seeds} seeds: " + ", ".join(f"{name} {value / 60:.0f} min"
                                                                  for name, value in estimate.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
