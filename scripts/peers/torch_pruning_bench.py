"""Torch-Pruning's side of the benchmark: preparation time, exactness of removal, accuracy.

Runs only in Torch-Pruning's own environment (see ``environments.py``)::

    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section prepare \\
        --models resnet18 resnet50 --repeats 5 --out prepare.json
    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section exactness \\
        --out exactness.json
    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section accuracy \\
        --baseline-checkpoint out/prune/baseline.pt --targets 0.7 0.5 0.3 --seed 0 \\
        --methods magnitude group_norm taylor --work-dir out/tp --out accuracy.json

Sections:

``prepare``
    One thread; per model the median seconds of ``DependencyGraph().build_dependency`` (build)
    and of listing its pruning groups with ``get_all_groups`` (groups), classifier ignored, with
    Conv2d and Linear layers as group roots; and, as a user readies a FLOPs-targeted prune, of
    constructing a ``MagnitudePruner`` (L1 importance, ratio 0.5, same ignored layers) plus the
    FLOPs count of ``tp.utils.count_ops_and_params`` (pruner_flops).
``exactness``
    In every group 10% of the channels (rounded down, at least one, seeded) are removed with the
    group's own ``prune()``; the output is compared with the masked model (see
    :func:`build_masked_model`).
``accuracy``
    The protocol of ``dagprune prune --method l1`` with Torch-Pruning's pruners: load a
    baseline; for each method (:data:`ACCURACY_METHODS`: L1 magnitude, group L2 norm, Taylor)
    and FLOPs target, train ``--steps`` steps at ``--lr`` while the pruner removes channels
    ``--prune-times`` times (its ``iterative_steps``, local pruning), every ``--step-epoch``
    steps, to the channel ratio that reaches the target (found by bisection with one-shot
    pruning, cached in ``--ratio-cache``); then ``--finetune-steps`` steps at ``--lr / 10``
    (same batches as ``dagprune prune``), evaluate, and save the pruned model as a dagprune DAG
    under ``--work-dir``.

Every model (or target) is measured on its own: a failure is recorded as
``"stage: Type: message"`` in its row's ``error`` and the next one runs. The JSON file
``{"tool", "version", "module_version", "timm", "torch", "section", "threads", "arguments",
"results"}`` is rewritten (atomically) after every row; ``version`` is the installed
distribution's (``torch_pruning.__version__``, kept as ``module_version``, can lag behind it).
Rows hold:

- prepare: ``model, input_size, build_s, groups_s, total_s, pruner_flops_s`` (medians),
  ``first_total_s``, ``groups``, ``error``;
- exactness: ``model, weights, dtype, input_size, groups, skipped_groups, closed_channels,
  max_rel_diff, exact, masks_took_effect, mask_effect_rel_diff, flops_proportion,
  error``;
- accuracy: see :func:`empty_accuracy_row`.

FLOPs proportions are ``tp.utils.count_ops_and_params`` of the pruned over the original model
(``dagprune_flops_proportion``: the same ratio by ``dagprune.count_flops``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import timm
import torch
import torch_pruning as tp

REPO_ROOT = Path(__file__).resolve().parents[2]
# the peer environment sees the main environment's site-packages, but not its editable install
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the shared helpers
from benchmarks.common import StageError, stage, write_json  # noqa: E402
from torch_pruning_accuracy import ACCURACY_METHODS, accuracy_rows  # noqa: E402
from torch_pruning_exactness import measure_exactness  # noqa: E402
from torch_pruning_models import ROOT_MODULE_TYPES, classifier_layers, create_model  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0",
          "convnext_tiny", "regnety_004", "densenet121", "deit_tiny_patch16_224",
          "vit_small_patch16_224", "fbnetv3_g", "repvit_m1"]
"""The twelve models of the comparison (timm names, ``pretrained=False``)."""


# ----------------------------------------------------------------------------------- prepare
def measure_prepare(name: str, repeats: int) -> dict:
    """Dependency-graph and group-listing times of one model; see the module docstring."""
    row = {"model": name, "input_size": None, "build_s": None, "groups_s": None, "total_s": None,
           "pruner_flops_s": None, "first_total_s": None, "groups": None, "error": None}
    try:
        model, input_shape = create_model(name)
        row["input_size"] = list(input_shape)
        ignored = classifier_layers(model)
        example_inputs = torch.randn(1, *input_shape)
        builds, listings, pruners = [], [], []
        for _ in range(repeats):
            with stage("dependency graph"):
                started = time.perf_counter()
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
                builds.append(time.perf_counter() - started)
            with stage("groups"):
                started = time.perf_counter()
                groups = list(graph.get_all_groups(ignored_layers=ignored,
                                                   root_module_types=ROOT_MODULE_TYPES))
                listings.append(time.perf_counter() - started)
            with stage("pruner and FLOPs"):
                started = time.perf_counter()
                tp.pruner.MagnitudePruner(model, example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=0.5, ignored_layers=ignored)
                tp.utils.count_ops_and_params(model, example_inputs)
                pruners.append(time.perf_counter() - started)
    except StageError as error:
        row["error"] = str(error)
        return row
    totals = [build + listing for build, listing in zip(builds, listings)]
    row.update(build_s=statistics.median(builds), groups_s=statistics.median(listings),
               total_s=statistics.median(totals), pruner_flops_s=statistics.median(pruners),
               first_total_s=totals[0], groups=len(groups))
    return row


# ------------------------------------------------------------------------------------ output
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", required=True, choices=["prepare", "exactness", "accuracy"])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="MODEL",
                        help="timm models (prepare, exactness)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (prepare)")
    parser.add_argument("--randomize-constant-weights", action="store_true",
                        help="exactness: random values for timm's constant-initialised tensors "
                             "(zero-initialised branch norms, layer scales), see "
                             "randomize_constant_weights")
    parser.add_argument("--float64", action="store_true",
                        help="exactness: compute in float64; random weights can make a model so "
                             "ill-conditioned that float32 rounding alone exceeds the tolerance")
    parser.add_argument("--model", default="test_resnet", help="timm model (accuracy)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None,
                        help="accuracy data as `dagprune prune --data-dir` reads it (default: digits)")
    parser.add_argument("--baseline-checkpoint", help="baseline.pt of a `dagprune prune` run")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                        help="FLOPs targets as fractions of the baseline's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="training steps at --lr")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps at --lr / 10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit-val", type=int, default=None,
                        help="accuracy: evaluate on this many validation images (as `dagprune prune`)")
    parser.add_argument("--methods", nargs="+", choices=sorted(ACCURACY_METHODS),
                        default=sorted(ACCURACY_METHODS), help="accuracy: Torch-Pruning importances")
    parser.add_argument("--prune-times", type=int, default=None,
                        help="accuracy: prunes during --steps (default: as `dagprune prune --method l1`)")
    parser.add_argument("--step-epoch", type=int, default=None,
                        help="accuracy: steps between prunes (default: as `dagprune prune --method l1`)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="accuracy: where each method and target keeps its row and pruned model "
                             "(a row saved there with the same arguments is reused)")
    parser.add_argument("--ratio-cache", type=Path, default=None,
                        help="accuracy: JSON file of the pruning ratio found for each FLOPs target")
    args = parser.parse_args(argv)
    if args.section == "accuracy":
        if not args.baseline_checkpoint or not args.work_dir:
            parser.error("--section accuracy needs --baseline-checkpoint and --work-dir")
        from dagprune_algorithms.app.iterative_job import iterative_schedule

        args.prune_times, args.step_epoch = iterative_schedule(args.steps, args.prune_times, args.step_epoch)

    if args.section == "prepare":
        torch.set_num_threads(1)
        rows = (measure_prepare(name, args.repeats) for name in args.models)
    elif args.section == "exactness":
        dtype = torch.float64 if args.float64 else torch.float32
        rows = (measure_exactness(name, args.randomize_constant_weights, dtype)
                for name in args.models)
    else:
        rows = accuracy_rows(args)
    report = {"tool": "Torch-Pruning", "version": version("torch-pruning"),
              "module_version": tp.__version__, "timm": timm.__version__,
              "torch": torch.__version__, "section": args.section,
              "threads": torch.get_num_threads(),
              "arguments": {key: str(value) if isinstance(value, Path) else value
                            for key, value in vars(args).items()},
              "results": []}
    write_json(args.out, report)
    for row in rows:
        report["results"].append(row)
        write_json(args.out, report)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
