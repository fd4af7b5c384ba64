"""GPU checks: exactness with TF32 off and on, bf16 autocast pruning, a sync-free training step,
and gated vs plain step times. Writes its figures to resources/gpu.md.

    python scripts/gpu_check.py              # on the GPU when there is one, else on the CPU
    python scripts/gpu_check.py --device cpu --out build/gpu_check.md   # what CI runs

Tolerances: conversion and removal are exact up to 1e-5 / 1e-4 relative in float32 with TF32
off; with TF32 on, matrix products round their inputs to 10 mantissa bits, so the check uses
5e-3 (the figure reported is the measured difference). On the CPU the sync check counts the
tensor read-backs (item, tolist, ...) of the step instead of torch.cuda's sync debug mode.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import dagprune  # noqa: E402
from dagprune_algorithms.pruning import ChannelPruning  # noqa: E402
from zoo import ZOO, input_shapes, make_example_inputs  # noqa: E402

MODELS = ("resnet_basic_blocks", "tiny_vit", "mobilenetv2_depthwise")
TF32_TOLERANCE = 5e-3
STEPS = 8


def _tf32(enabled: bool):
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    @contextlib.contextmanager
    def switch():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    return switch()


def _prepared(name: str, device: str):
    entry = ZOO[name]
    (shape,) = input_shapes(entry)
    model = entry.factory(seed=0).to(device).eval()
    dag = dagprune.build_from_unstructured_module(model)
    config = ChannelPruning(dag, shape, pruning_proportion=0.5, num_training_steps=1000)
    gated = config.prepare_for_pruning()
    inputs = tuple(x.to(device) for x in make_example_inputs(entry, batch_size=8))
    return model, dag, config, gated, inputs


def exactness(name: str, device: str, tf32: bool) -> dict:
    """Conversion and removal differences (random gate states) for one model."""
    with _tf32(tf32), torch.no_grad():
        model, dag, config, gated, inputs = _prepared(name, device)
        conversion = dagprune.max_relative_difference(model(*inputs), dag(*inputs))
        generator = torch.Generator().manual_seed(0)
        for gate in config.gates:
            gate.logits.data = torch.randn(gate.logits.shape, generator=generator).to(device)
        slim = config.remove_channels().eval()
        removal = dagprune.max_relative_difference(gated.eval()(*inputs), slim(*inputs))
    return {"model": name, "tf32": tf32, "conversion": conversion, "removal": removal}


def _step(config, gated, optimizer, inputs, step, autocast_dtype=None):
    context = (torch.autocast(inputs[0].device.type, dtype=autocast_dtype) if autocast_dtype
               else contextlib.nullcontext())
    with context:
        loss = gated(*inputs).float().square().mean()
        losses = config.compute_current_proportion_and_pruning_losses(global_step=step)
    (loss + sum(losses[1:])).backward()
    optimizer.step()
    optimizer.zero_grad()


def sync_free_steps(name: str, device: str) -> str:
    """Runs training steps with syncs forbidden; returns 'none' or what synchronised."""
    _, _, config, gated, inputs = _prepared(name, device)
    gated.train()
    optimizer = torch.optim.SGD([{"params": config.weight_parameters()},
                                 {"params": config.gate_parameters()}], lr=1e-3)
    for step in range(3):
        _step(config, gated, optimizer, inputs, step)
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(3, 3 + STEPS):
                _step(config, gated, optimizer, inputs, step)
        except RuntimeError as error:
            return f"synchronised: {error}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "none"
    from test_host_syncs import _SyncCounter
    with _SyncCounter() as counter:
        for step in range(3, 3 + STEPS):
            _step(config, gated, optimizer, inputs, step)
    return "none" if not counter.calls else f"read-backs: {dict(counter.calls)}"


def bf16_autocast_run(name: str, device: str) -> dict:
    """A short bf16 autocast pruning run, then removal exactness in float32."""
    _, _, config, gated, inputs = _prepared(name, device)
    gated.train()
    optimizer = torch.optim.Adam([{"params": config.weight_parameters()},
                                  {"params": config.gate_parameters(), "lr": 0.1}], lr=1e-3)
    for step in range(STEPS):
        _step(config, gated, optimizer, inputs, step, torch.bfloat16)
    slim = config.remove_channels().eval()
    with torch.no_grad():
        removal = dagprune.max_relative_difference(gated.eval()(*inputs), slim(*inputs))
    return {"model": name, "hard_proportion": config.current_hard_proportion(), "removal": removal}


def _timed(function, device: str, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            function()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def step_times(name: str, device: str) -> dict:
    """Median step time of the plain model and of the gated model with the pruning losses."""
    model, _, config, gated, inputs = _prepared(name, device)
    model.train(), gated.train()
    plain_optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    gated_optimizer = torch.optim.SGD([{"params": config.weight_parameters()},
                                       {"params": config.gate_parameters()}], lr=1e-3)
    counter = iter(range(1, 10_000))

    def plain():
        model(*inputs).square().mean().backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    def gated_step():
        _step(config, gated, gated_optimizer, inputs, next(counter))

    plain(), gated_step()
    plain_s, gated_s = _timed(plain, device), _timed(gated_step, device)
    return {"model": name, "plain_ms": plain_s * 1e3, "gated_ms": gated_s * 1e3, "ratio": gated_s / plain_s}


def _report(device: str, exact: list, syncs: dict, bf16: list, times: list) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "CPU"
    lines = ["# GPU checks\n", f"Command: `python scripts/gpu_check.py --device {device}`  ",
             f"Device: {device} ({name}); torch {torch.__version__}.\n"]
    if not device.startswith("cuda"):
        lines.append("**No GPU figures have been measured yet**: this run used the CPU fallback.\n")
    lines += ["## Exactness (relative differences)\n", "| model | TF32 | conversion | removal |",
              "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {'on' if r['tf32'] else 'off'} | {r['conversion']:.2e} | {r['removal']:.2e} |"
              for r in exact]
    lines += ["\n## Host synchronisations in the training step\n", "| model | syncs |", "|---|---|"]
    lines += [f"| {model} | {result} |" for model, result in syncs.items()]
    lines += ["\n## bf16 autocast pruning run\n", "| model | hard FLOPs share | removal difference (fp32) |",
              "|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['hard_proportion']:.3f} | {r['removal']:.2e} |" for r in bf16]
    lines += ["\n## Step times (batch 8, median)\n", "| model | plain ms | gated ms | gated / plain |",
              "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['plain_ms']:.2f} | {r['gated_ms']:.2f} | {r['ratio']:.2f}x |" for r in times]
    return "\n".join(lines) + "\n"


def run(device: str, models=MODELS) -> tuple[str, bool]:
    """Runs every check; returns the report and whether every check passed."""
    tf32_modes = (False, True) if device.startswith("cuda") else (False,)
    exact = [exactness(name, device, tf32) for name in models for tf32 in tf32_modes]
    syncs = {name: sync_free_steps(name, device) for name in models}
    bf16 = [bf16_autocast_run(name, device) for name in models]
    times = [step_times(name, device) for name in models]
    passed = all(r["conversion"] <= (TF32_TOLERANCE if r["tf32"] else 1e-5)
                 and r["removal"] <= (TF32_TOLERANCE if r["tf32"] else 1e-4) for r in exact)
    passed = passed and all(result == "none" for result in syncs.values())
    passed = passed and all(r["removal"] <= 1e-4 for r in bf16)
    return _report(device, exact, syncs, bf16, times), passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(ZOO))
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "gpu.md")
    args = parser.parse_args(argv)
    report, passed = run(args.device, args.models)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
