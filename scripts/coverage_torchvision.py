"""Sweep torchvision's classification and segmentation models: conversion, save/load, channel groups, exact removal.

For every name in ``torchvision.models.list_models(module=torchvision.models)`` and
``list_models(module=torchvision.models.segmentation)`` (``weights=None``, segmentation
backbones without weights too, eval mode; a segmentation model's output is its ordered dict)
this records, one JSON line per model:

* ``converts_exactly``: :func:`dagprune.compare_module_outputs` <= 1e-5 (relative);
* ``roundtrip_exact``: the DAG, saved with ``dag.save``, loads with :func:`dagprune.load_dag` in a
  fresh process that imports only torch and dagprune (not torchvision, and registers nothing: a
  saved DAG must load without its user's registrations) and computes bit-equal outputs and
  state; ``load_imports_torchvision``: whether the loader had to import torchvision's support on
  demand (a graph that names torchvision layers or functions);
* ``prunable``: :func:`find_channel_groups` finds a prunable group; ``prunable_proportion`` from
  ``ChannelPruning(dag, input_size, 0.5, 10).prepare_for_pruning()``;
* ``removal_exact``: under random gate logits, the slim model from ``remove_channels()``
  computes what the gated eval model computes (<= 1e-4 relative).

Each model runs in its own subprocess under a wall-clock timeout; the child writes its record
after each stage, so a model that times out still reports the stages it finished. Models run at
their smallest input size (``min_size`` of their weights' metadata, at least 64 px; ViT, Swin and
MaxViT need 224), inception_v3 at 299 without auxiliary logits. Models with more than
``--max-params`` parameters (counted on the meta device, or read from the weights' metadata) are
skipped with the reason.

Usage::

    nice -n 15 python scripts/coverage_torchvision.py                 # all, writes the table
    python scripts/coverage_torchvision.py --models resnet18 'efficientnet_*'
    python scripts/coverage_torchvision.py --table-only              # table from the JSONL
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # sweep_harness and removal_check, shared with the other sweeps
    sys.path.insert(0, str(SCRIPTS))

import sweep_harness  # noqa: E402
from sweep_harness import CONVERSION_TOLERANCE, REMOVAL_TOLERANCE  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "build" / "coverage_torchvision" / "results.jsonl"
DEFAULT_TABLE = REPO_ROOT / "resources" / "supported_torchvision.md"
MIN_SIDE = 64
# models whose builder needs arguments to run as a plain classifier in eval mode
BUILD_ARGUMENTS = {"inception_v3": {"aux_logits": False, "init_weights": True},
                   "googlenet": {"aux_logits": False, "init_weights": True}}
FIXED_SIDES = {"inception_v3": 299}


def classification_models() -> list[str]:
    """The classifiers, then the segmentation models (detectors loop over their images in
    Python: their backbones are converted instead, see tests/test_torchvision_detection.py)."""
    import torchvision
    return (sorted(torchvision.models.list_models(module=torchvision.models))
            + sorted(torchvision.models.list_models(module=torchvision.models.segmentation)))


def build_arguments(name: str) -> dict:
    """What ``name``'s builder needs to run in eval mode without downloading weights."""
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        return {"weights_backbone": None}
    return BUILD_ARGUMENTS.get(name, {})


def count_parameters(name: str) -> int:
    """Parameters of ``name`` built on the meta device (no memory used), or, for builders that
    compute on tensors (RegNets), as declared by its weights' metadata."""
    import torch
    import torchvision
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None, **build_arguments(name))
        return sum(p.numel() for p in model.parameters())
    except NotImplementedError:
        return list(torchvision.models.get_model_weights(name))[0].meta["num_params"]


def input_side(name: str) -> int:
    """The smallest side the model's weights declare (at least ``MIN_SIDE``)."""
    import torchvision
    if name in FIXED_SIDES:
        return FIXED_SIDES[name]
    weights = list(torchvision.models.get_model_weights(name))
    minimum = weights[0].meta.get("min_size", (224, 224)) if weights else (224, 224)
    return max(MIN_SIDE, *minimum)


def check_model(name: str, report) -> None:
    """Runs every stage on ``name``, calling ``report(**fields)`` as each result is known."""
    import torch
    import torchvision

    import dagprune as dp
    from dagprune_algorithms.pruning import find_channel_groups
    from removal_check import prepare_at_target_or_reachable, removal_difference_at_random_gates

    side = input_side(name)
    input_size = (3, side, side)
    report(input_size=list(input_size), stage="build")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **build_arguments(name))
    model.eval()
    report(params=sum(p.numel() for p in model.parameters()), stage="convert")

    dag = dp.build_from_unstructured_module(model)
    difference = float(dp.compare_module_outputs(model, dag, input_shape=(1, *input_size),
                                                 raise_error=False))
    report(convert_max_rel_diff=difference, converts_exactly=difference <= CONVERSION_TOLERANCE,
           stage="roundtrip")

    exact, imported_torchvision = _round_trips_without_torchvision(dag, input_size)
    report(roundtrip_exact=exact, load_imports_torchvision=imported_torchvision, stage="groups")

    analysis = find_channel_groups(dag, input_size)
    prunable_groups = [group for group in analysis.groups if group.prunable]
    report(prunable=bool(prunable_groups), prunable_groups=len(prunable_groups), stage="prune")
    if not prunable_groups:
        report(stage="done")
        return

    pruning, gated, _ = prepare_at_target_or_reachable(dag, input_size, 0.5, 10)
    report(prunable_proportion=float(pruning.prunable_proportion), stage="remove")

    removal_difference, _, _ = removal_difference_at_random_gates(pruning, gated, input_size, 1, seed=1)
    report(removal_max_rel_diff=removal_difference,
           removal_exact=removal_difference <= REMOVAL_TOLERANCE, stage="done")


def _round_trips_without_torchvision(dag, input_size) -> tuple[bool, bool]:
    """Whether the saved DAG loads bit-exactly in a process that has not imported torchvision,
    and whether loading it had to import torchvision (a graph naming torchvision functions)."""
    import torch
    x = torch.randn(1, *input_size)
    loaded = sweep_harness.load_in_fresh_process(dag, (x,), library="torchvision", block=False,
                                                 temp_prefix="dagprune-tv-")
    if loaded.exact is None:
        raise RuntimeError("loading without torchvision failed: " + sweep_harness.last_line(loaded.stderr))
    if not loaded.exact:
        raise AssertionError("the loaded DAG differs from the saved one")
    return True, loaded.imported_library


# ------------------------------------------------------------------------------------ the sweep
def _error_fields(error: BaseException, record: dict) -> dict:
    message = str(error).strip()
    return {"error": f"{type(error).__name__}: {message.splitlines()[0][:300] if message else ''}",
            "traceback": traceback.format_exc()[-2000:]}


def sweep(names: list[str], results: Path, timeout: float, max_params: int) -> None:
    def check_or_skip(name: str) -> dict:
        params = count_parameters(name)
        if params > max_params:
            return {"name": name, "params": params,
                    "skipped": f"{params / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M"}
        return sweep_harness.run_in_subprocess(__file__, name, timeout, "dagprune-tv-record-")

    sweep_harness.sweep(names, results, check_or_skip)


# ------------------------------------------------------------------------------------ the table
def write_table(results: Path, table: Path, note: str = "") -> None:
    records = sweep_harness.read_records(results)
    mark = sweep_harness.mark
    checked = [r for r in records.values() if "skipped" not in r]
    count = lambda key: sum(bool(r.get(key)) for r in checked)  # noqa: E731
    lines = [
        "# torchvision classification and segmentation models",
        "",
        "Written by `scripts/coverage_torchvision.py` (`weights=None`, eval mode, batch 1). "
        "Convert: output within 1e-5 (relative) of the original. Save/load: the saved DAG loads "
        "in a fresh process (importing only torch and dagprune, no registration), bit-exact. "
        "Prunable: a prunable channel group. Removal: slim model within 1e-4 of the gated model under random gates.",
        "",
        f"**{count('converts_exactly')} of {len(checked)} convert, {count('roundtrip_exact')} "
        f"save/load, {count('prunable')} prunable, {count('removal_exact')} removal-exact** "
        f"({len(records) - len(checked)} skipped as too large).{(' ' + note) if note else ''}",
        "",
        "| model | params (M) | input | convert | save/load | prunable | prunable proportion | removal | failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(records):
        r = records[name]
        params = f"{r['params'] / 1e6:.1f}" if "params" in r else "-"
        if "skipped" in r:
            lines.append(f"| {name} | {params} | - | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        side = r.get("input_size", [0, 0, 0])[1]
        proportion = f"{r['prunable_proportion']:.3f}" if "prunable_proportion" in r else "-"
        failure = r.get("error", "")
        if not failure and r.get("load_imports_torchvision"):
            failure = "(loading imports torchvision: the DAG keeps torchvision layers whole)"
        if not failure and r.get("converts_exactly") is False:
            failure = f"output differs by {r['convert_max_rel_diff']:.1e}"
        if not failure and r.get("removal_exact") is False:
            failure = f"removal differs by {r['removal_max_rel_diff']:.1e}"
        lines.append(f"| {name} | {params} | {side} | {mark(r.get('converts_exactly'))} | "
                     f"{mark(r.get('roundtrip_exact'))} | {mark(r.get('prunable'))} | "
                     f"{proportion} | {mark(r.get('removal_exact'))} | {sweep_harness.escape(failure)} |")
    table.write_text("\n".join(lines) + "\n")


def main() -> None:
    if sweep_harness.child_main(check_model, _error_fields):
        return
    args = sweep_harness.parse_sweep_arguments(
        __doc__.split("\n\n")[0], results=DEFAULT_RESULTS, table=DEFAULT_TABLE, timeout=120.0,
        extra=lambda parser: parser.add_argument("--max-params", type=float, default=150e6))
    if not args.table_only:
        names = sweep_harness.matching(classification_models(), args.models)
        sweep(names, args.results, args.timeout, int(args.max_params))
    write_table(args.results, args.table, args.note)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
