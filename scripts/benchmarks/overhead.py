"""Training-step overhead of the gated model over the plain model, and gate parameter counts.

For each model the plain DAG and the gated DAG take alternating training steps (forward,
backward, Adam step; the gated step also computes the three pruning losses) on the same batch,
so machine noise hits both alike; the ratio of the medians is reported, and the median and
quartiles of the per-round ratios (a slow stretch of a shared machine hits both steps of a
round), which the target is judged on. The step index grows from 1, as in a training loop: the
non-finite check that reads the device every ``finite_check_interval`` (100) steps does not
fall in the timed steps. The eval-mode forward (no gradient; the gated model with its hard
masks) is timed the same way. torch-dag's gate parameter counts come from its ``prepare`` run
(the parameters its pruning model adds).
"""

from __future__ import annotations

import itertools
import statistics

import torch
import torch.nn.functional as F

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning

from .common import log, error_text, interleaved_times, paired_ratio


def _training_step(model, optimizer, x, y, pruning=None, steps=None):
    loss = F.cross_entropy(model(x), y)
    if pruning is not None:
        _, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(next(steps))
        loss = loss + flops + entropy + bkd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def build_plain_and_gated(name: str, input_shape: tuple) -> tuple:
    """The plain DAG of timm's ``name`` (10 classes), and the gated DAG of the same weights with
    its :class:`ChannelPruning` (target 0.5), both in train mode."""
    torch.manual_seed(0)
    plain = dagprune.build_from_unstructured_module(create_timm_model(name, input_shape, num_classes=10))
    torch.manual_seed(0)
    source = dagprune.build_from_unstructured_module(create_timm_model(name, input_shape, num_classes=10))
    pruning = ChannelPruning(source, input_shape, 0.5, 10_000)
    gated = pruning.prepare_for_pruning()
    plain.train(), gated.train()
    return plain, gated, pruning


def training_steps(plain, gated, pruning, input_shape: tuple, batch_size: int) -> tuple:
    """Two no-argument callables, a training step of the plain and of the gated model (each with
    its own Adam, on one fixed random batch), and that batch's input."""
    plain_optimizer = torch.optim.Adam(plain.parameters(), 1e-4)
    gated_optimizer = torch.optim.Adam(gated.parameters(), 1e-4)
    x, y = torch.randn(batch_size, *input_shape), torch.randint(0, 10, (batch_size,))
    steps = itertools.count(1)
    return (lambda: _training_step(plain, plain_optimizer, x, y),
            lambda: _training_step(gated, gated_optimizer, x, y, pruning, steps), x)


def measure(name: str, image_size: int, batch_size: int, repeats: int) -> dict:
    log(f"overhead {name}")
    input_shape = (3, image_size, image_size)
    row = {"model": name, "input_size": list(input_shape), "batch_size": batch_size, "error": None}
    try:
        plain, gated, pruning = build_plain_and_gated(name, input_shape)
        plain_step, gated_step, x = training_steps(plain, gated, pruning, input_shape, batch_size)
        plain_steps, gated_steps = interleaved_times([plain_step, gated_step], repeats, warmup=2)
        plain.eval(), gated.eval()
        with torch.no_grad():
            plain_evals, gated_evals = interleaved_times([lambda: plain(x), lambda: gated(x)], repeats, warmup=2)
    except Exception as error:
        row["error"] = error_text("overhead", error)
        return row
    plain_s, gated_s = statistics.median(plain_steps), statistics.median(gated_steps)
    plain_eval_s, gated_eval_s = statistics.median(plain_evals), statistics.median(gated_evals)
    pair_median, pair_low, pair_high = paired_ratio(gated_steps, plain_steps)
    row.update(plain_ms=1000 * plain_s, gated_ms=1000 * gated_s, ratio=gated_s / plain_s,
               pair_ratio=pair_median, pair_ratio_quartiles=[pair_low, pair_high],
               eval_pair_ratio=paired_ratio(gated_evals, plain_evals)[0],
               plain_eval_ms=1000 * plain_eval_s, gated_eval_ms=1000 * gated_eval_s,
               eval_ratio=gated_eval_s / plain_eval_s,
               groups=len(pruning.prunable_groups),
               gate_parameters=sum(p.numel() for p in pruning.gate_parameters()),
               model_parameters=sum(p.numel() for p in plain.parameters()))  # the same weights as the source
    return row


def run(options) -> dict:
    return {"dagprune": {"tool": "dagprune", "threads": torch.get_num_threads(),
                         "results": [measure(name, options.overhead_image_size, options.overhead_batch_size,
                                             options.repeats) for name in options.models]}}
