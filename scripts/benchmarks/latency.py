"""Real speed of pruned models: CPU latency at 0.7 / 0.5 / 0.3 of the FLOPs.

Each model is pruned without training to each target, once per width rule (``round_to`` of
``ChannelPruning``: 1 keeps any channel count, ``auto`` rounds kept counts to the multiple the
width table of this machine chose, an int to that multiple): gates start from L1 importance and
``ChannelPruning.calibrate_to_target`` closes the least important channels across all groups
until the hard FLOPs share reaches the target; ``remove_channels`` gives the slim model. The
original and all its slim versions are timed in alternation (so noise hits all alike) with
torch at 1 and 2 intra-op threads and batch 1 and 32, and with onnxruntime when it is installed.
"""

from __future__ import annotations

import importlib.util
import io
import statistics

import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning, measure_width_table

from .common import log, error_text, interleaved_times, paired_ratio

TARGETS = (0.7, 0.5, 0.3)


def slim_models(name: str, image_size: int | None, targets,
                round_to_values=(1,)) -> tuple[tuple, dagprune.DagModule, list]:
    """``(input_shape, original DAG, [(target, round_to asked, round_to used, FLOPs share, slim
    DAG)])``, one slim DAG per target and ``round_to`` value."""
    torch.manual_seed(0)
    model = create_timm_model(name).eval()
    input_shape = tuple(model.pretrained_cfg["input_size"])
    if image_size:
        input_shape = (input_shape[0], image_size, image_size)
        model = create_timm_model(name, input_shape).eval()
    dag = dagprune.build_from_unstructured_module(model).eval()
    original_flops = dagprune.count_flops(dag, input_shape).total
    slims = []
    for round_to in round_to_values:
        for target in targets:
            pruning = ChannelPruning(dag, input_shape, target, 1000, initial_importance="l1",
                                     round_to=round_to)
            pruning.prepare_for_pruning().eval()
            pruning.calibrate_to_target()
            slim = pruning.remove_channels().eval()
            share = dagprune.count_flops(slim, input_shape).total / original_flops
            slims.append((target, round_to, pruning.round_to, share, slim))
    return input_shape, dag, slims


def _torch_runner(model, x):
    def forward():
        with torch.inference_mode():
            model(x)
    return forward


def _onnx_runner(model, x, threads: int):
    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), session_options,
                                           providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _runtimes() -> list[str]:
    """torch, and onnxruntime when it is installed."""
    return ["torch", "onnxruntime"] if importlib.util.find_spec("onnxruntime") is not None else ["torch"]


def measure(name: str, options) -> list[dict]:
    log(f"latency {name}")
    try:
        input_shape, dag, slims = slim_models(name, options.latency_image_size, options.targets,
                                              options.latency_round_to)
    except Exception as error:
        return [{"model": name, "error": error_text("pruning", error)}]
    rows = []
    previous_threads = torch.get_num_threads()
    try:
        for runtime in _runtimes():
            for threads in options.latency_threads:
                torch.set_num_threads(threads)
                for batch_size in options.latency_batch_sizes:
                    x = torch.randn(batch_size, *input_shape)
                    models = [dag] + [slim for *_, slim in slims]
                    try:
                        runners = [_torch_runner(m, x) if runtime == "torch" else _onnx_runner(m, x, threads)
                                   for m in models]
                        repeats = options.repeats if batch_size == 1 else max(3, options.repeats // 2)
                        times = interleaved_times(runners, repeats, warmup=1)
                    except Exception as error:
                        rows.append({"model": name, "runtime": runtime, "threads": threads,
                                     "batch_size": batch_size, "error": error_text(runtime, error)})
                        continue
                    setting = {"model": name, "input_size": list(input_shape), "runtime": runtime,
                               "threads": threads, "batch_size": batch_size}
                    rows += [_row(setting, slim, times[0], slim_times) for slim, slim_times in zip(slims, times[1:])]
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _row(setting: dict, slim: tuple, original_times: list, slim_times: list) -> dict:
    """One latency row. The speed-up (and the efficiency judged on it) is the median of the
    per-round ratios original / pruned, the two timed back to back (quartiles beside it); the
    ratio of the two medians is kept as ``speedup_of_medians``."""
    target, asked, used, share, _ = slim
    original_s, slim_s = statistics.median(original_times), statistics.median(slim_times)
    speedup, low, high = paired_ratio(original_times, slim_times)
    return {**setting, "target": target, "round_to": asked, "multiple": used, "flops_proportion": share,
            "original_ms": 1000 * original_s, "pruned_ms": 1000 * slim_s, "speedup": speedup,
            "speedup_quartiles": [low, high], "speedup_of_medians": original_s / slim_s,
            "flops_reduction": 1 / share, "efficiency": speedup * share, "error": None}


def run(options) -> dict:
    rows = [row for name in options.latency_models for row in measure(name, options)]
    return {"dagprune": {"tool": "dagprune", "round_to": list(options.latency_round_to), "width_table": _width_table(),
                         "results": rows}}


def _width_table() -> str:
    """The summary of this machine's width table (what ``round_to="auto"`` read)."""
    return measure_width_table().summary()
