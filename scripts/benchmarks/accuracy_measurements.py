"""The accuracy section's last stage: every pruned model measured alike, in this process.

Both tools save their pruned models as dagprune DAGs; each is loaded here and, against its
seed's baseline (converted to a DAG the same way), gets its FLOPs share
(``dagprune.count_flops``), parameter count, top-1 accuracy on the validation images, and its
latency: the baseline and every pruned model of a seed are timed in alternation
(:func:`~.common.interleaved_times`, so machine noise hits all alike), in eval mode under
``torch.inference_mode``, at one thread with batch 1 and 32, and at the training's thread count
with batch 32 when that is more than one (``--budget latency`` measures its table there). A model's
latency is the median of its timings; its share is the median of its per-round ratios to the
baseline's timing of the same round (:func:`~.common.paired_ratio`), which a slow stretch of a
shared machine moves less than the ratio of the two medians. This runs after all training, so
the timings do not compete with it.
"""

from __future__ import annotations

import functools
import statistics

import torch

import dagprune
from dagprune_algorithms.app.data import load_dataset
from dagprune_algorithms.app.models import as_dag, create_timm_model
from dagprune_algorithms.app.training import evaluate_accuracy, load_checkpoint, materialize

from .common import StageError, fixed_input, interleaved_times, log, paired_ratio, stage

LATENCY_BATCH_SIZES = (1, 32)
"""Batch sizes timed at one thread."""

ACCURACY_MISMATCH = 0.05
"""Points by which a tool's own accuracy of a model may differ from this stage's."""


def latency_settings(threads: int) -> list[tuple[int, int]]:
    """``(threads, batch)`` pairs timed: one thread at :data:`LATENCY_BATCH_SIZES`, and
    ``threads`` at batch 32 when more than one."""
    return [(1, batch) for batch in LATENCY_BATCH_SIZES] + ([(threads, 32)] if threads > 1 else [])


def setting_name(threads: int, batch: int) -> str:
    """``"1t_b32"``: the key of a latency setting in the rows."""
    return f"{threads}t_b{batch}"


def _timings_ms(models: list, input_shape, threads: int, batch: int, repeats: int) -> list[list[float]]:
    """Milliseconds of every timed round of each model, the models called in alternation."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = fixed_input(input_shape, batch)
        with torch.inference_mode():
            calls = [functools.partial(model, x) for model in models]
            return [[1000 * s for s in series] for series in interleaved_times(calls, repeats, warmup=2)]
    finally:
        torch.set_num_threads(previous)


def _baseline_dag(options, baseline: dict) -> dagprune.DagModule:
    torch.manual_seed(baseline["seed"])
    model = create_timm_model(options.acc_model, tuple(baseline["input_shape"]),
                              num_classes=baseline["num_classes"])
    model.load_state_dict(load_checkpoint(baseline["checkpoint"])["model"])
    return as_dag(model.eval()).eval()


def _load_pruned(row: dict, input_shape, baseline_flops: int, val) -> dagprune.DagModule:
    """Loads ``row``'s pruned DAG and fills in its FLOPs share, parameters and accuracy."""
    with stage("load"):
        dag = dagprune.load_dag(row["pruned_path"]).eval()
    with stage("flops"):
        row["flops_proportion"] = dagprune.count_flops(dag, input_shape).total / baseline_flops
        row["params"] = sum(p.numel() for p in dag.parameters())
    with stage("evaluation"):
        row["accuracy"] = evaluate_accuracy(dag, *val)
    own = row.get("job_accuracy")
    row["accuracy_mismatch"] = own is not None and abs(own - row["accuracy"]) > ACCURACY_MISMATCH
    return dag


def measure_pruned_models(options, baselines: list[dict], rows: list[dict]) -> dict:
    """Measures every pruned model of ``rows`` (in place: ``flops_proportion``, ``params``,
    ``accuracy``, ``latency_ms`` and ``latency_share`` by setting) and each baseline
    (``flops``, ``params``, ``measured_accuracy``, ``latency_ms``); a model that cannot be
    measured gets an ``error``. Returns the settings used."""
    threads = torch.get_num_threads()
    settings = latency_settings(threads)
    for baseline in baselines:
        seed, input_shape = baseline["seed"], tuple(baseline["input_shape"])
        log(f"accuracy: measuring the pruned models of seed {seed}")
        split = load_dataset(options.data_dir, image_size=options.acc_image_size, seed=seed,
                             limit_val=options.acc_limit_val)
        val = materialize(split.val)
        base = _baseline_dag(options, baseline)
        baseline_flops = dagprune.count_flops(base, input_shape).total
        baseline.update(flops=baseline_flops, params=sum(p.numel() for p in base.parameters()),
                        measured_accuracy=evaluate_accuracy(base, *val))
        measured = []
        for row in rows:
            if row["seed"] != seed or row.get("error") or not row.get("pruned_path"):
                continue
            try:
                measured.append((row, _load_pruned(row, input_shape, baseline_flops, val)))
            except StageError as error:
                row["error"] = f"measurement: {error}"
        baseline["latency_ms"] = {}
        for setting in settings:
            name = setting_name(*setting)
            times = _timings_ms([base] + [dag for _, dag in measured], input_shape, *setting,
                                repeats=options.acc_latency_repeats)
            baseline["latency_ms"][name] = statistics.median(times[0])
            for (row, _), series in zip(measured, times[1:]):
                row.setdefault("latency_ms", {})[name] = statistics.median(series)
                row.setdefault("latency_share", {})[name] = paired_ratio(series, times[0])[0]
    return {"settings": [setting_name(*s) for s in settings], "repeats": options.acc_latency_repeats,
            "threads": threads}
