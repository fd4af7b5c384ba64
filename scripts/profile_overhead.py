"""Where the gated training step spends its time beyond the plain step: a per-op profile.

Builds the plain and the gated DAG of a timm model as the overhead benchmark does
(``scripts/benchmarks/overhead.py``: same weights, Adam, the three pruning losses on the gated
step), runs ``--steps`` profiled training steps of each after two untimed ones, and prints the
ops whose self CPU time per step grew the most (gated minus plain), then, for the gated step,
the costliest of those ops split by input shape (which names the mask site: a masked layer
norm's ``[rows, channels]`` tensors, a head-dim mask's ``[batch, heads, tokens, dim]``...).

Timings from ``torch.profiler`` are per op and include the profiler's own overhead; the
sum of the differences is an attribution, not a measurement of the step's ratio (that is
``python scripts/benchmark.py --sections overhead``)::

    OMP_NUM_THREADS=1 python scripts/profile_overhead.py --model deit_tiny_patch16_224 --size 224
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.overhead import build_plain_and_gated, training_steps  # noqa: E402


def per_step_self_ms(step, steps: int, by_shape: bool = False) -> dict:
    """Self CPU milliseconds and calls per step of each op (keyed by name, or by name and input
    shapes) over ``steps`` profiled calls of ``step``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as profiler:
        for _ in range(steps):
            step()
    averages = profiler.key_averages(group_by_input_shape=by_shape)
    return {(event.key, str(event.input_shapes) if by_shape else ""):
            (event.self_cpu_time_total / 1000 / steps, event.count / steps) for event in averages}


def grown_ops(plain: dict, gated: dict, count: int) -> list[tuple[float, str]]:
    """The ``count`` ops whose self time per step grew most from ``plain`` to ``gated``."""
    names = {key for key, _ in plain} | {key for key, _ in gated}
    growth = [(gated.get((name, ""), (0.0, 0))[0] - plain.get((name, ""), (0.0, 0))[0], name) for name in names]
    return sorted(growth, reverse=True)[:count]


def report(model: str, size: int, batch: int, steps: int, top: int) -> None:
    input_shape = (3, size, size)
    plain, gated, pruning = build_plain_and_gated(model, input_shape)
    plain_step, gated_step, _ = training_steps(plain, gated, pruning, input_shape, batch)
    for _ in range(2):
        plain_step(), gated_step()
    plain_ops, gated_ops = per_step_self_ms(plain_step, steps), per_step_self_ms(gated_step, steps)
    plain_total, gated_total = (sum(ms for ms, _ in ops.values()) for ops in (plain_ops, gated_ops))
    print(f"{model} at {size} px, batch {batch}, {torch.get_num_threads()} thread(s), {steps} profiled steps each")
    print(f"self CPU per step: plain {plain_total:.1f} ms, gated {gated_total:.1f} ms")
    print("\n| op | gated - plain ms | plain ms (calls) | gated ms (calls) |\n|---|---:|---:|---:|")
    grown = grown_ops(plain_ops, gated_ops, top)
    for growth, name in grown:
        p, g = plain_ops.get((name, ""), (0.0, 0)), gated_ops.get((name, ""), (0.0, 0))
        print(f"| {name} | {growth:.1f} | {p[0]:.1f} ({p[1]:.0f}) | {g[0]:.1f} ({g[1]:.0f}) |")
    shaped = per_step_self_ms(gated_step, 1, by_shape=True)
    names = {name for growth, name in grown if growth > 0}
    rows = sorted(((ms, calls, name, shapes) for (name, shapes), (ms, calls) in shaped.items() if name in names),
                  reverse=True)[:top]
    print("\nGated step, those ops by input shapes (one profiled step):\n")
    print("| op | input shapes | ms | calls |\n|---|---|---:|---:|")
    for ms, calls, name, shapes in rows:
        print(f"| {name} | `{shapes[:120]}` | {ms:.1f} | {calls:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps of each model")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    options = parser.parse_args()
    report(options.model, options.size, options.batch, options.steps, options.top)


if __name__ == "__main__":
    main()
