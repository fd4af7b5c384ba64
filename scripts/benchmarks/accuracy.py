"""Accuracy against FLOPs and latency: dagprune's methods and Torch-Pruning's, several seeds.

Per seed one baseline is trained until its held-out accuracy plateaus
(:mod:`.baseline_training`); every method then starts from it at every target with the same
budget: ``--acc-steps`` steps at ``--acc-lr`` during which it prunes (gates trained with the
FLOPs loss, or iterative prunes every ``steps / 5`` steps), then ``--acc-finetune-steps`` steps
at a tenth of it, with the same batch size and the same batches (``dagprune prune``'s
``batch_indices``, seeds ``seed + 1`` and ``seed + 2``). dagprune runs through the ``dagprune
prune`` job itself; Torch-Pruning through ``scripts/peers/torch_pruning_bench.py --section
accuracy`` in its own environment. At the end every pruned model (saved as a DAG by both
tools) is evaluated, counted and timed in this process alike (:mod:`.accuracy_measurements`).

Each run keeps its results in ``<work-dir>/accuracy/seed<N>/``; a rerun with the same settings
reads them back instead of training again, so an interrupted benchmark resumes.

The full run (3 seeds x 3 targets x 7 methods, resnet18 on Fashion-MNIST, the defaults of
``scripts/benchmark.py``) takes about 2.5 to 3 hours at 2 threads and 4.5 hours at one on the
2-core machine it was sized on (``python scripts/benchmarks/accuracy_sizing.py`` measures the
step times and estimates it anew)::

    OMP_NUM_THREADS=2 python scripts/benchmark.py --sections accuracy \
        --work-dir build/benchmarks_accuracy --out resources/benchmarks_accuracy.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dagprune_algorithms.app.data import load_dataset
from dagprune_algorithms.app.iterative_job import iterative_schedule
from dagprune_algorithms.app.models import as_dag, create_timm_model
from dagprune_algorithms.app.prune_job import LATENCY_BATCH, add_prune_arguments, run_prune
from dagprune_algorithms.app.training import materialize

from .accuracy_measurements import measure_pruned_models
from .baseline_training import LR_DECAY, PlateauRule, split_selection, train_converged_baseline
from .common import error_text, log, write_json
from .peers import run_peer

FORMAT = 2
"""Version of ``accuracy.json``; the report refuses other versions (rerun the section)."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A pruning method of the section: its label in the report, the tool that runs it, and
    how (extra ``dagprune prune`` arguments, or the peer script's method name)."""

    label: str
    tool: str
    job_arguments: tuple[str, ...] = ()
    peer_method: str | None = None
    budget: str = "flops"


METHODS = {
    "dag_distill": Method("dagprune differentiable + distillation", "dagprune",
                          ("--method", "dag", "--distill", "on")),
    "dag": Method("dagprune differentiable", "dagprune", ("--method", "dag", "--distill", "off")),
    "l1": Method("dagprune L1 iterative", "dagprune", ("--method", "l1", "--distill", "off")),
    "dag_latency": Method("dagprune differentiable + distillation, latency budget", "dagprune",
                          ("--method", "dag", "--distill", "on", "--budget", "latency"), budget="latency"),
    "tp_magnitude": Method("Torch-Pruning magnitude (L1), iterative", "torch-pruning", peer_method="magnitude"),
    "tp_group_norm": Method("Torch-Pruning group norm (L2), iterative", "torch-pruning",
                            peer_method="group_norm"),
    "tp_taylor": Method("Torch-Pruning Taylor, iterative", "torch-pruning", peer_method="taylor"),
}
"""Every method of the section, by the name ``--acc-methods`` takes."""

OURS = "dag_distill"
"""The method the targets are about."""

LATENCY_TABLE_ATTEMPTS = 3
LATENCY_TABLE_MAX_FIT_ERROR = 0.15
"""``--budget latency``'s table is timed in seconds and cached; one timed while other processes
ran can be far off (fit errors from 0.07 to 0.8 were seen for resnet18 on 2 shared cores), so it
is measured up to this many times until its fit error is at most this, the best one kept."""


def baseline_for_seed(options, seed: int, folder: Path) -> dict:
    """The seed's converged baseline (trained, or read back); see :mod:`.baseline_training`."""
    split = load_dataset(options.data_dir, image_size=options.acc_image_size, seed=seed,
                         limit_val=options.acc_limit_val)
    train, val = materialize(split.train), materialize(split.val)
    train, selection = split_selection(train, options.acc_baseline_selection, seed)
    torch.manual_seed(seed)  # the initialisation `dagprune prune --seed` would use
    model = create_timm_model(options.acc_model, tuple(split.input_shape), num_classes=split.num_classes)
    rule = PlateauRule(options.acc_baseline_eval_every, options.acc_baseline_patience,
                       options.acc_baseline_min_delta)
    phases = [options.acc_baseline_max_steps] + ([options.acc_baseline_decay_max_steps]
                                                 if options.acc_baseline_decay_max_steps else [])
    started = time.perf_counter()
    result = train_converged_baseline(model, train, selection, val, lr=options.acc_lr,
                                      batch_size=options.acc_batch_size, seed=seed, phase_max_steps=phases,
                                      rule=rule, folder=folder)
    log(f"accuracy: seed {seed} baseline {result['accuracy']:.2f}% after {result['steps']} steps "
        f"(best at step {result['best_step']}; {time.perf_counter() - started:.0f} s)")
    return {"seed": seed, "input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "data": split.name, "train_images": len(train[0]), "selection_images": len(selection[0]),
            "val_images": len(val[0]), **result}


def prepare_latency_table(options, baseline: dict, cache: Path) -> dict:
    """Measures (into ``cache``, where the ``--budget latency`` runs read it) the latency table of
    the model, up to :data:`LATENCY_TABLE_ATTEMPTS` times until its fit error is at most
    :data:`LATENCY_TABLE_MAX_FIT_ERROR`, and leaves the best one there; returns its path, fit
    error and the attempts made. A table already in the cache is kept as it is (a resumed benchmark
    has runs that used it). The table's key holds the model's structure, input, device and thread
    count, so this one is the runs' own."""
    from dagprune_algorithms.pruning.latency_table import measure_latency_table

    input_shape = tuple(baseline["input_shape"])
    dag = as_dag(create_timm_model(options.acc_model, input_shape, num_classes=baseline["num_classes"]))
    best = None
    for attempt in range(1, LATENCY_TABLE_ATTEMPTS + 1):
        table = measure_latency_table(dag, input_shape, batch_size=LATENCY_BATCH, device="cpu",
                                      cache_dir=cache, progress=False)
        path = Path(table.path)
        log(f"accuracy: latency table {path}: fit error {table.fit_error():.3f}"
            + (" (from the cache)" if table.from_cache else ""))
        if best is None or table.fit_error() < best[0]:
            best = (table.fit_error(), path.read_text())
        if table.from_cache or best[0] <= LATENCY_TABLE_MAX_FIT_ERROR or attempt == LATENCY_TABLE_ATTEMPTS:
            break  # a cached table may have served runs already: it stays
        path.unlink()  # measure again
    path.write_text(best[1])
    return {"path": str(path), "fit_error": best[0], "attempts": attempt, "batch_size": LATENCY_BATCH,
            "threads": torch.get_num_threads()}


def _job_arguments(options, seed: int) -> list[str]:
    arguments = ["--model", options.acc_model, "--image-size", str(options.acc_image_size),
                 "--steps", str(options.acc_steps), "--finetune-steps", str(options.acc_finetune_steps),
                 "--batch-size", str(options.acc_batch_size), "--lr", str(options.acc_lr),
                 "--seed", str(seed)]
    if options.acc_limit_val:
        arguments += ["--limit-val", str(options.acc_limit_val)]
    return arguments + (["--data-dir", str(options.data_dir)] if options.data_dir else [])


def _empty_row(key: str, target: float, seed: int) -> dict:
    method = METHODS[key]
    return {"method": method.label, "method_key": key, "tool": method.tool, "budget": method.budget,
            "target": target, "seed": seed, "error": None}


def _saved_row(path: Path, settings) -> dict | None:
    """The row a run with the same ``settings`` saved at ``path`` (None: none, or failed)."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings or saved["row"].get("error"):
        return None
    return saved["row"]


def run_dagprune(options, key: str, target: float, seed: int, baseline: Path, folder: Path) -> dict:
    """One ``dagprune prune`` run of method ``key``; its row from the job's ``report.json``."""
    out = folder / f"{key}_{target}"
    arguments = _job_arguments(options, seed) + list(METHODS[key].job_arguments) + [
        "--target", str(target), "--baseline-checkpoint", str(baseline), "--no-reference", "--no-progress",
        "--device", "cpu", "--out", str(out)]
    if METHODS[key].budget == "latency":
        arguments += ["--latency-cache", str(folder.parent / "latency_cache")]
    saved = _saved_row(out / "row.json", arguments)
    if saved is not None:
        return saved
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    row = _empty_row(key, target, seed)
    log(f"accuracy: seed {seed}, {METHODS[key].label}, target {target}")
    started = time.perf_counter()
    try:
        run_prune(parser.parse_args(arguments))
        report = json.loads((out / "report.json").read_text())
    except Exception as error:
        row["error"] = error_text(key, error)
        return row
    baseline_row, pruned = report["rows"][0], report["rows"][-1]
    row.update(tool_flops_proportion=report["final_proportion"], accuracy=100 * pruned["accuracy"],
               job_accuracy=100 * pruned["accuracy"], baseline_accuracy=100 * baseline_row["accuracy"],
               accuracy_before_finetune=report["accuracy_before_finetune"], params=pruned["params"],
               target_reached=report["target_reached"], budget_reached=report["budget"]["reached"],
               job_latency_share=report["budget"]["measured_latency_share"],
               pruned_path=str(out / "pruned"), seconds=time.perf_counter() - started)
    write_json(out / "row.json", {"settings": arguments, "row": row})
    return row


def run_torch_pruning(options, keys: list[str], seed: int, baseline: Path, folder: Path) -> tuple[list, dict]:
    """Torch-Pruning's methods ``keys`` at every target for one seed, in its environment;
    returns the rows and the peer run's record (version, command, or error)."""
    peer_methods = {METHODS[key].peer_method: key for key in keys}
    log(f"accuracy: seed {seed}, Torch-Pruning {', '.join(peer_methods)} at {options.targets}")
    peer = run_peer("torch-pruning", "accuracy", _job_arguments(options, seed) + [
        "--baseline-checkpoint", str(baseline), "--targets", *map(str, options.targets),
        "--methods", *peer_methods, "--work-dir", str(folder / "torch_pruning"),
        "--ratio-cache", str(folder.parent / "torch_pruning_ratios.json")], options.peer_timeout)
    rows = []
    done = set()
    for result in peer.get("results", []):
        key = peer_methods[result.pop("method")]
        result["tool_flops_proportion"] = result.pop("flops_proportion")
        rows.append({**_empty_row(key, result["target"], seed), **result, "job_accuracy": result.get("accuracy")})
        done.add((key, result["target"]))
    for key in keys:
        for target in options.targets:
            if (key, target) not in done:
                rows.append({**_empty_row(key, target, seed),
                             "error": peer.get("error") or "torch-pruning: no result"})
    record = {name: peer.get(name) for name in ("version", "timm", "torch", "threads", "command", "error")}
    return rows, record


def _selected_methods(options) -> tuple[list[str], list[str], list[str]]:
    """``(dagprune methods, Torch-Pruning methods, notes)`` of ``--acc-methods``; Torch-Pruning's
    run only when ``--peers`` names it."""
    ours = [k for k in options.acc_methods if METHODS[k].tool == "dagprune"]
    theirs = [k for k in options.acc_methods if METHODS[k].tool == "torch-pruning"]
    notes = []
    if theirs and "torch-pruning" not in options.peers:
        notes.append(f"not run (torch-pruning not in --peers): {', '.join(METHODS[k].label for k in theirs)}")
        theirs = []
    return ours, theirs, notes


def run(options) -> dict:
    folder = Path(options.work_dir) / "accuracy"
    ours, theirs, notes = _selected_methods(options)
    started = time.perf_counter()
    baselines, rows, peers, latency_table = [], [], [], None
    for seed in options.seeds:
        seed_folder = folder / f"seed{seed}"
        baseline = baseline_for_seed(options, seed, seed_folder)
        baselines.append(baseline)
        if latency_table is None and any(METHODS[k].budget == "latency" for k in ours):
            latency_table = prepare_latency_table(options, baseline, folder / "latency_cache")
        checkpoint = Path(baseline["checkpoint"])
        for target in options.targets:
            for key in ours:
                rows.append(run_dagprune(options, key, target, seed, checkpoint, seed_folder))
        if theirs:
            peer_rows, record = run_torch_pruning(options, theirs, seed, checkpoint, seed_folder)
            rows += peer_rows
            peers.append(record)
    training_seconds = time.perf_counter() - started
    measurements = measure_pruned_models(options, baselines, rows)
    prune_times, step_epoch = iterative_schedule(options.acc_steps)
    setup = {"model": options.acc_model, "data": options.data_dir or "digits (scikit-learn)",
             "image_size": options.acc_image_size, "input_shape": baselines[0]["input_shape"],
             "steps": options.acc_steps, "finetune_steps": options.acc_finetune_steps,
             "batch_size": options.acc_batch_size, "lr": options.acc_lr, "lr_decay": LR_DECAY,
             "prune_times": prune_times, "step_epoch": step_epoch, "targets": options.targets,
             "seeds": options.seeds, "methods": {k: METHODS[k].label for k in ours + theirs},
             "ours": METHODS[OURS].label,
             "latency_budget_methods": [METHODS[k].label for k in ours + theirs if METHODS[k].budget == "latency"],
             "baseline_rule": {"eval_every": options.acc_baseline_eval_every,
                               "patience": options.acc_baseline_patience,
                               "min_delta": options.acc_baseline_min_delta,
                               "max_steps": options.acc_baseline_max_steps,
                               "decay_max_steps": options.acc_baseline_decay_max_steps,
                               "selection_images": options.acc_baseline_selection},
             "threads": torch.get_num_threads(), "latency_table": latency_table, "notes": notes}
    return {"format": FORMAT, "setup": setup, "baselines": baselines, "results": rows, "peers": peers,
            "measurements": measurements, "training_seconds": training_seconds,
            "seconds": time.perf_counter() - started}
