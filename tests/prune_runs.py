"""Helpers of the tests that run ``dagprune prune`` in-process on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import dagprune

TINY = ["--steps", "6", "--baseline-steps", "4", "--finetune-steps", "2", "--limit-train", "96",
        "--limit-val", "48", "--batch-size", "16", "--image-size", "16", "--no-progress",
        "--checkpoint-every", "3"]
"""A run of seconds: 4 baseline steps, 6 pruning steps, 2 fine-tuning steps, a checkpoint every 3."""


def fast_latency(monkeypatch) -> None:
    """Replaces the latency measurement (not under test, and most of a tiny run's time) by a
    constant, so that two runs give identical reports."""
    from dagprune_algorithms.app import latency

    measured = latency.LatencyResult(median_ms=1.0, iqr_ms=0.0, p25_ms=1.0, p75_ms=1.0, batch_size=32,
                                     num_threads=1, device="cpu", repeats=1)
    share = latency.LatencyShare(median=1.0, p25=1.0, p75=1.0, rounds=1)
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: measured)
    monkeypatch.setattr(latency, "measure_latency_share", lambda *args, **kwargs: share)


def run_results(out: Path) -> dict:
    """What a finished run in ``out`` computed: its report without the timing and the arguments
    that change no result, and the tensors of its pruned DAG."""
    report = json.loads((out / "report.json").read_text())
    del report["elapsed_s"]
    for name in ("out", "checkpoint_every", "no_progress"):
        del report["arguments"][name]
    state = dagprune.load_dag(out / "pruned").state_dict()
    return {"report": report, "pruned": {name: tensor.clone() for name, tensor in state.items()}}


def assert_same_results(first: dict, second: dict) -> None:
    """Asserts two :func:`run_results` are bit-identical."""
    assert first["report"] == second["report"]
    assert first["pruned"].keys() == second["pruned"].keys()
    for name, tensor in first["pruned"].items():
        assert torch.equal(tensor, second["pruned"][name]), name
