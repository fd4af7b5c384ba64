"""``--budget latency``'s measured calibration: the slim model timed against the original, and
the gates recalibrated until the measured latency share meets the target."""

from __future__ import annotations

import logging

import torch

from dagprune_algorithms.app.distributed import Ranks
from dagprune_algorithms.app import latency
from dagprune_algorithms.pruning.calibration import match_measured_share

LOG = logging.getLogger("dagprune.prune")

CALIBRATION_ALTERNATIONS = 10
"""Timings of the original and the slim model, in alternation, per measured calibration round:
enough that both models meet a quiet stretch of a shared machine (with 5, one model timed while
another process held a core read 10-20% off)."""


def alternated_latency_share(original, slim, input_shape, device, batch_size: int,
                             alternations: int = CALIBRATION_ALTERNATIONS) -> float:
    """The latency of ``slim`` over that of ``original``, timed in alternation (a slow spell
    hits both) at ``batch_size`` on ``device``: the ratio of each model's fastest quartile over
    the alternations, since other work on the machine only ever adds time."""
    times = {"original": [], "slim": []}
    for _ in range(alternations):
        for name, model in (("original", original), ("slim", slim)):
            times[name].append(latency.measure_latency(model, input_shape, batch_size=batch_size,
                                                       device=device, warmup=1, repeats=5).p25_ms)
    return min(times["slim"]) / min(times["original"])


def match_measured_latency(pruning, dag, input_shape, device, ranks: Ranks, batch_size: int) -> list:
    """Recalibrates the trained gates of ``pruning`` until the slim model's *measured* latency
    share (:func:`alternated_latency_share` at ``batch_size`` on ``device``) is within 2% of the
    target (:func:`~dagprune_algorithms.pruning.calibration.match_measured_share`); returns the
    rounds. Every process uses the mean of their measurements, so all calibrate alike."""

    def measured_share() -> float:
        share = alternated_latency_share(dag, pruning.remove_channels(), input_shape, device, batch_size)
        return float(ranks.mean_(torch.tensor(share, device=device)))

    records = match_measured_share(pruning, measured_share)
    LOG.info("latency budget: measured share %s (predicted %s) over %d calibration round(s)",
             " -> ".join(f"{r['measured']:.3f}" for r in records),
             " -> ".join(f"{r['predicted']:.3f}" for r in records), len(records) - 1)
    return records
