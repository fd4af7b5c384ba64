"""Accuracy against FLOPs on a data set: dagprune's two methods and Torch-Pruning's.

Per seed one baseline is trained; every method starts from it at every target and gets the same
budget: ``--acc-steps`` steps at the job's learning rate (pruning while training for dagprune's
differentiable and L1 iterative methods; fine-tuning after a one-shot magnitude prune for
Torch-Pruning), then ``--acc-finetune-steps`` steps at a tenth of it, the same batch size, data
order and seeds. dagprune runs through the ``dagprune prune`` job itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dagprune_algorithms.app.data import load_dataset
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.app.prune_job import add_prune_arguments, run_prune
from dagprune_algorithms.app.training import evaluate_accuracy, materialize, save_checkpoint, train_steps

from .common import error_text
from .peers import run_peer

METHODS = {"dag": "dagprune (differentiable)", "l1": "dagprune (L1 iterative)"}


def train_baseline(options, seed: int, folder: Path) -> tuple[Path, float]:
    """Trains (or reuses) the seed's unpruned model; returns its checkpoint and accuracy in %."""
    path = folder / "baseline.pt"
    split = load_dataset(options.data_dir, image_size=options.acc_image_size, seed=seed)
    train, val = materialize(split.train), materialize(split.val)
    torch.manual_seed(seed)
    model = create_timm_model(options.acc_model, tuple(split.input_shape), num_classes=split.num_classes)
    if path.exists():
        model.load_state_dict(torch.load(path)["model"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=options.acc_lr)
        train_steps(model, optimizer, train, options.acc_batch_size, seed, options.acc_baseline_steps,
                    checkpoint_path=folder / "baseline_training.ckpt")
        save_checkpoint(path, {"model": model.state_dict()})
    return path, evaluate_accuracy(model, *val)


def _job_arguments(options, seed: int) -> list[str]:
    arguments = ["--model", options.acc_model, "--image-size", str(options.acc_image_size),
                 "--steps", str(options.acc_steps), "--finetune-steps", str(options.acc_finetune_steps),
                 "--batch-size", str(options.acc_batch_size), "--lr", str(options.acc_lr),
                 "--seed", str(seed)]
    return arguments + (["--data-dir", str(options.data_dir)] if options.data_dir else [])


def run_dagprune(options, method: str, target: float, seed: int, baseline: Path, folder: Path) -> dict:
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    out = folder / f"{method}_{target}"
    args = parser.parse_args(_job_arguments(options, seed) + [
        "--method", method, "--target", str(target), "--baseline-checkpoint", str(baseline),
        "--no-reference", "--no-progress", "--device", "cpu", "--out", str(out)])
    row = {"method": METHODS[method], "target": target, "seed": seed, "error": None}
    try:
        run_prune(args)
    except Exception as error:
        row["error"] = error_text(method, error)
        return row
    report = json.loads((out / "report.json").read_text())
    pruned = report["rows"][-1]
    row.update(flops_proportion=report["final_proportion"], accuracy=100 * pruned["accuracy"],
               accuracy_before_finetune=report["accuracy_before_finetune"], params=pruned["params"],
               seconds=report["elapsed_s"])
    return row


def run(options) -> dict:
    folder = Path(options.work_dir) / "accuracy"
    baselines, rows, peer_runs = [], [], []
    for seed in options.seeds:
        seed_folder = folder / f"seed{seed}"
        seed_folder.mkdir(parents=True, exist_ok=True)
        checkpoint, accuracy = train_baseline(options, seed, seed_folder)
        baselines.append({"seed": seed, "accuracy": accuracy})
        for target in options.targets:
            for method in METHODS:
                rows.append(run_dagprune(options, method, target, seed, checkpoint, seed_folder))
        if "torch-pruning" in options.peers:
            peer = run_peer("torch-pruning", "accuracy", _job_arguments(options, seed) + [
                "--baseline-checkpoint", str(checkpoint), "--targets", *map(str, options.targets)],
                options.peer_timeout)
            peer_runs.append(peer)
            for result in peer.get("results", []):
                rows.append({**result, "method": "Torch-Pruning (magnitude, one-shot)", "seed": seed})
            if "error" in peer:
                rows.append({"method": "Torch-Pruning (magnitude, one-shot)", "seed": seed,
                             "error": peer["error"]})
    setup = {"model": options.acc_model, "data": options.data_dir or "digits (scikit-learn)",
             "image_size": options.acc_image_size, "baseline_steps": options.acc_baseline_steps,
             "steps": options.acc_steps, "finetune_steps": options.acc_finetune_steps,
             "batch_size": options.acc_batch_size, "lr": options.acc_lr}
    return {"setup": setup, "baselines": baselines, "results": rows,
            "peer_commands": [p.get("command") for p in peer_runs]}
