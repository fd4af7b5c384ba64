"""Where a pruned model's time goes: per kind of op, time and FLOPs before and after pruning.

Explains the latency benchmark's efficiency (speed-up / FLOPs reduction): a kind of op whose time
shrinks less than the model's FLOPs (memory-bound depthwise convs, norms, activations, the fixed
cost of each op call at batch 1) pulls it below 1. The model is pruned without training to
``--target`` of its FLOPs as the latency benchmark prunes it (L1-ranked gates, calibrated,
``--round-to``); every vertex of the original and the slim DAG is then timed on its own
(the DAG's own loop with a clock around each call, all models alternating, median per
vertex), and the vertices are summed by kind::

    OMP_NUM_THREADS=1 python scripts/latency_breakdown.py --models mobilenetv2_100 resnet18 \\
        --target 0.3 --batch 1 32 --threads 1 --fold both --out resources/latency_breakdown.md

Per-vertex times add up to a little more than the model's time (the clock's own cost); the
shares, not the sums, are the measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import dagprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.latency import slim_models  # noqa: E402

KINDS = ("dense conv", "depthwise/grouped conv", "linear/matmul", "norm", "activation", "other")


def op_kind(module: nn.Module) -> str:
    """The kind a vertex's module is summed under."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "dense conv" if module.groups == 1 else "depthwise/grouped conv"
    if isinstance(module, nn.Linear) or getattr(module, "function_name", "").endswith(("matmul", "linear", "bmm")):
        return "linear/matmul"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if type(module).__module__ == "torch.nn.modules.activation":
        return "activation"
    return "other"


def vertex_seconds(dag: dagprune.DagModule, x: torch.Tensor) -> list[float]:
    """Seconds of each inner vertex in one forward pass of ``dag`` on ``x`` (inference mode)."""
    values = {dag.inputs[0]: x}
    seconds = []
    with torch.inference_mode():
        for vertex in dag.inner_vertices:
            arguments = [values[p] for p in vertex.predecessors]
            started = time.perf_counter()
            values[vertex] = vertex.module(*arguments)
            seconds.append(time.perf_counter() - started)
    return seconds


def kind_table(dag: dagprune.DagModule, input_shape, per_vertex: list[float]) -> dict[str, list[float]]:
    """``kind -> [seconds, FLOPs]`` summed over the DAG's vertices (FLOPs at batch 1)."""
    flops = dagprune.count_flops(dag, input_shape).per_vertex
    table = defaultdict(lambda: [0.0, 0.0])
    for vertex, seconds in zip(dag.inner_vertices, per_vertex):
        row = table[op_kind(vertex.module)]
        row[0] += seconds
        row[1] += flops.get(vertex.name, 0)
    return table


def breakdown(name: str, target: float, batch: int, repeats: int, round_to, folds) -> list[str]:
    """The markdown rows of ``name``'s breakdown, one table per entry of ``folds`` (False: as
    pruned; True: both models with their batch norms folded into the convs, see
    :func:`dagprune.fold_batch_norms`). Every model is timed in alternation with the others."""
    input_shape, original, slims = slim_models(name, None, [target], (round_to,))
    slim = slims[0][-1]
    pairs = {fold: (dagprune.fold_batch_norms(original), dagprune.fold_batch_norms(slim)) if fold
             else (original, slim) for fold in folds}
    models = [model for pair in pairs.values() for model in pair]
    x = torch.randn(batch, *input_shape)
    for _ in range(2):  # warm-up
        for model in models:
            vertex_seconds(model, x)
    runs = [[] for _ in models]
    for _ in range(repeats):
        for model, timings in zip(models, runs):
            timings.append(vertex_seconds(model, x))
    medians = [[statistics.median(column) for column in zip(*timings)] for timings in runs]
    rows = []
    for index, (fold, (before_model, after_model)) in enumerate(pairs.items()):
        before = kind_table(before_model, input_shape, medians[2 * index])
        after = kind_table(after_model, input_shape, medians[2 * index + 1])
        rows += _kind_rows(f"{name}{' (folded)' if fold else ''}", batch, before, after)
    return rows


def _kind_rows(label: str, batch: int, before: dict, after: dict) -> list[str]:
    total = [sum(row[i] for row in table.values()) for table in (before, after) for i in (0, 1)]
    rows = []
    for kind in KINDS:
        if kind not in before:
            continue
        (t0, f0), (t1, f1) = before[kind], after.get(kind, [0.0, 0.0])
        rows.append(f"| {label} | {batch} | {kind} | {1000 * t0:.2f} | {100 * t0 / total[0]:.0f}% | "
                    f"{1000 * t1:.2f} | {t1 / t0:.2f} | {f1 / f0 if f0 else float('nan'):.2f} |")
    speedup, reduction = total[0] / total[2], total[1] / total[3]
    rows.append(f"| {label} | {batch} | **all** | {1000 * total[0]:.2f} | 100% | {1000 * total[2]:.2f} | "
                f"{total[2] / total[0]:.2f} | {total[3] / total[1]:.2f} (efficiency {speedup / reduction:.2f}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2_100", "resnet18"])
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--round-to", default="1", help="1, a multiple, or auto")
    parser.add_argument("--fold", choices=["no", "yes", "both"], default="both",
                        help="fold batch norms into convs in both models first (both: one table each)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    round_to = options.round_to if options.round_to == "auto" else int(options.round_to)
    lines = [f"Pruned to {options.target} of the FLOPs (round_to {options.round_to}), {options.threads} thread(s); "
             "time and FLOPs of each kind of op, original and slim; ratio = slim / original.", "",
             "| model | batch | kind | original ms | share of time | slim ms | time ratio | FLOPs ratio |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    folds = {"no": [False], "yes": [True], "both": [False, True]}[options.fold]
    for name in options.models:
        for batch in options.batch:
            rows = breakdown(name, options.target, batch, options.repeats, round_to, folds)
            lines += rows
            print("\n".join(rows), flush=True)
    text = "\n".join(lines) + "\n"
    if options.out:
        options.out.write_text(text)


if __name__ == "__main__":
    main()
