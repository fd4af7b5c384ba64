"""``--budget latency``'s measured calibration: the slim model timed against the original, and
the gates recalibrated until the measured latency share meets the target."""

from __future__ import annotations

import logging

import torch

from dagprune_algorithms.app.distributed import Ranks
from dagprune_algorithms.app import latency
from dagprune_algorithms.pruning.calibration import match_measured_share

LOG = logging.getLogger("dagprune.prune")

CALIBRATION_ROUNDS = 40
"""Pairs of passes (original, then slim) timed per measured calibration round."""


def alternated_latency_share(original, slim, input_shape, device, batch_size: int,
                             rounds: int = CALIBRATION_ROUNDS) -> float:
    """The latency of ``slim`` over that of ``original`` at ``batch_size`` on ``device``: one pass
    of each per round, the median of the rounds' ratios (:func:`.latency.measure_latency_share`).
    On a shared 2-core machine, six measurements of the same two models (resnet18 at 32 px and
    a slim copy, batch 32) read 0.532-0.546 this way and 0.515-0.612 as the ratio of each
    model's fastest quartile over 10 alternations of 5 passes."""
    return latency.measure_latency_share(slim, original, input_shape, batch_size=batch_size, device=device,
                                         rounds=rounds).median


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
