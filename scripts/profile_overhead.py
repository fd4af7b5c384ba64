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

``--layer-norm B T C`` times instead the masked layer norm's forward and backward on a
(B, T, C) activation next to ``F.layer_norm``'s (median of 30 after 3, a soft mask requiring
gradients), and with ``--compile`` a ``torch.compile``d composed masked layer norm as well (its
compilation time printed apart)::

    OMP_NUM_THREADS=1 python scripts/profile_overhead.py --layer-norm 32 197 192 --compile

``--subnormals`` also counts, over one gated step, the float32 subnormal values in every op's
inputs and outputs (arithmetic on them is many times slower on CPUs), per op.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.overhead import build_plain_and_gated, training_steps  # noqa: E402
from dagprune.ops.specs.normalization import masked_layer_norm  # noqa: E402


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


class SubnormalCount(TorchDispatchMode):
    """Counts, per op, the float32 subnormal values in the tensors it reads and writes."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        reads = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        writes = [] if func._overloadpacket in _UNINITIALISED else \
            [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.counts[str(func)] += sum(_subnormals(t) for t in reads + writes)
        return out


_UNINITIALISED = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                  torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided)  # they write garbage, not values


def _subnormals(tensor: torch.Tensor) -> int:
    if tensor.dtype != torch.float32:
        return 0
    magnitude = tensor.detach().abs()
    return int(((magnitude > 0) & (magnitude < torch.finfo(torch.float32).tiny)).sum())


def report(model: str, size: int, batch: int, steps: int, top: int, subnormals: bool = False) -> None:
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
    if subnormals:
        with SubnormalCount() as counter:
            gated_step()
        found = {name: count for name, count in counter.counts.items() if count}
        print(f"\nSubnormal float32 values read or written in one gated step: {sum(found.values())}"
              + "".join(f"\n- {name}: {count}" for name, count in sorted(found.items(), key=lambda kv: -kv[1])))


def _composed_masked_layer_norm(x, mask, weight, bias, eps: float):
    """The masked layer norm as plain ops, for torch.compile to fuse."""
    weights = mask / mask.sum()
    centered = x - (x * weights).sum(-1, keepdim=True)
    var = (centered * centered * weights).sum(-1, keepdim=True)
    return centered * torch.rsqrt(var + eps) * weight + bias


def time_layer_norms(shape: list[int], compiled: bool, calls: int = 30) -> None:
    """Median forward + backward milliseconds of the layer norms (see the module docstring)."""
    channels = shape[-1]
    x, grad = torch.randn(*shape), torch.randn(*shape)
    mask = torch.rand(channels, requires_grad=True)
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    norms = {"masked (dagprune)": lambda t: masked_layer_norm(t, mask, weight, bias, 1e-6),
             "F.layer_norm": lambda t: F.layer_norm(t, (channels,), weight, bias, 1e-6)}
    if compiled:
        fused = torch.compile(_composed_masked_layer_norm, dynamic=False)
        started = time.perf_counter()
        fused(x.clone().requires_grad_(), mask, weight, bias, 1e-6).backward(grad)
        print(f"torch.compile: {time.perf_counter() - started:.1f} s for the first call")
        norms["masked, torch.compile"] = lambda t: fused(t, mask, weight, bias, 1e-6)
    for name, norm in norms.items():
        times = []
        for index in range(calls + 3):
            started = time.perf_counter()
            norm(x.detach().requires_grad_()).backward(grad)
            if index >= 3:
                times.append(time.perf_counter() - started)
        print(f"{name}: {1000 * statistics.median(times):.2f} ms forward + backward at {tuple(shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps of each model")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--subnormals", action="store_true", help="count subnormal values per op")
    parser.add_argument("--layer-norm", nargs="+", type=int, metavar="SIZE",
                        help="time the layer norms on this activation shape instead of profiling a model")
    parser.add_argument("--compile", action="store_true", help="with --layer-norm: a torch.compile'd one too")
    options = parser.parse_args()
    if options.layer_norm:
        time_layer_norms(options.layer_norm, options.compile)
        return
    report(options.model, options.size, options.batch, options.steps, options.top, options.subnormals)


if __name__ == "__main__":
    main()
