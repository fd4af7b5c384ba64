"""Sweep Hugging Face transformers models: conversion, save/load, channel groups, exact removal.

Every class in :data:`transformers_tiny_models.MODELS` and ``MORE_MODELS`` is built from a tiny
config (random weights, no download, eval mode) and called with keyword example inputs
(:func:`transformers_tiny_models.example_inputs`): ``input_ids`` with an ``attention_mask`` that
pads one row (``use_cache=False`` for decoders, ``decoder_input_ids`` for encoder-decoders) for
text models, waveforms or log-mel features for speech, ``pixel_values`` for vision models.
One JSON line per model records:

* ``converts_exactly``: the model is called once (its first call in eval mode may change it), then
  converted; :func:`dagprune.compare_module_outputs` <= 1e-5 (relative) on the example inputs AND
  on a second input of another batch size (and, for text, another length and padding);
  ``output_type_kept``: the DAG returns the model's ``ModelOutput`` class; ``other_sizes``: False
  where the DAG refuses the second input's sizes with dagprune's own error (the model turned a size
  into a Python number, e.g. a recurrent scan's ``range(seq_len)``): conversion is then judged on
  the example alone, and so is removal;
* ``roundtrip_exact``: the DAG, saved with ``dag.save``, loads with :func:`dagprune.load_dag` in a
  fresh process where importing ``transformers`` raises ModuleNotFoundError (as if it were not
  installed), and computes bit-equal outputs and state; when it does not, ``roundtrip_error`` and
  ``roundtrip_with_transformers_exact`` (the same check in the converting process);
* ``prunable``: :func:`find_channel_groups` finds a prunable group (``unprunable_reasons``: the
  most common reasons of the others); ``prunable_proportion`` and ``max_removable_proportion``
  from ``ChannelPruning(dag, None, 0.5, 10, example_inputs=...)``;
* ``removal_exact``: under random gate logits, the slim model from ``remove_channels()`` computes
  what the gated eval model computes (<= 1e-4 relative) on both inputs; ``flops`` and
  ``slim_flops``: :func:`compute_flops` before and after removal.

A failing stage records ``error`` (type and first line), ``failed_stage`` and a short
``traceback``. Each model runs in its own subprocess under a wall-clock timeout; the child writes
its record after each stage, so a model that times out still reports the stages it finished.

Usage::

    nice -n 10 python scripts/coverage_transformers.py                  # all, writes the table
    python scripts/coverage_transformers.py --models 'Bert*' '*ForCausalLM'
    python scripts/coverage_transformers.py --table-only               # table from the JSONL
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "build" / "coverage_transformers" / "results.jsonl"
DEFAULT_TABLE = REPO_ROOT / "resources" / "supported_transformers.md"
PRUNING_TARGET = 0.5
SCRIPTS = Path(__file__).resolve().parent
for _path in (REPO_ROOT, SCRIPTS):  # dagprune; sweep_harness, removal_check: shared with the other sweeps
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import sweep_harness  # noqa: E402
from sweep_harness import (CONVERSION_TOLERANCE, REMOVAL_TOLERANCE, compare_bit_for_bit,  # noqa: E402
                           escape, first_line, last_line, load_in_fresh_process, mark, read_records,
                           run_in_subprocess, short_traceback)
from transformers_tiny_models import (MODELS, MORE_MODELS, build_model, describe, example_inputs,  # noqa: E402
                                      kind_of)


# ---------------------------------------------------------------------------------- the check
def check_model(name: str, report=None, seed: int = 0) -> dict:
    """Runs every stage on ``name`` in this process.

    Args:
        name: a key of :data:`MODELS` or ``MORE_MODELS`` (a transformers class name).
        report: called with keyword results as soon as each is known (so a parent that kills a
            slow child still has the stages that finished); None to only return them.
        seed: seeds the weights, the inputs and the gate logits.

    Returns:
        The recorded fields (see the module docstring). A failing stage raises; the fields
        recorded before it have gone to ``report``.
    """
    record: dict = {"kind": kind_of(name)}

    def note(**fields):
        record.update(fields)
        if report is not None:
            report(**fields)

    note(stage="build", kind=record["kind"])
    model = build_model(name, seed)
    inputs = example_inputs(name, model.config, seed=seed)
    second = example_inputs(name, model.config, second=True, seed=seed)
    note(params=sum(p.numel() for p in model.parameters()), example=describe(inputs),
         second_example=describe(second))

    note(stage="convert")
    dag, second = _convert(model, inputs, second, note)
    note(stage="roundtrip")
    _check_roundtrip(dag, inputs, note)
    note(stage="groups")
    if not _find_groups(dag, inputs, note):
        note(stage="done")
        return record
    note(stage="prune")
    pruning, gated = _prepare_pruning(dag, inputs, note)
    note(stage="flops")
    note(flops=int(_compute_flops(dag, inputs)))
    note(stage="remove")
    _check_removal(pruning, gated, inputs, second, seed, note)
    note(stage="done")
    return record


def _convert(model, inputs: dict, second: dict, note):
    """The DAG of ``model``, with its differences from the model on both inputs noted, and the
    second input (None when the DAG refuses its sizes: specialised on the example's)."""
    import torch

    import dagprune as dp
    from dagprune.compare import describe_non_finite
    with torch.no_grad():  # the reference output first: RWKV rescales its weights on its first eval call
        model(**inputs)
    dag = dp.build_from_unstructured_module(model, example_inputs=inputs)
    difference = float(dp.compare_module_outputs(model, dag, example_inputs=inputs, raise_error=False))
    note(convert_max_rel_diff=difference)
    second_difference, second = _second_input_difference(model, dag, second, note)
    with torch.no_grad():
        model_output, dag_output = model(**inputs), dag(**inputs)
    note(second_max_rel_diff=second_difference,
         reference_finite=describe_non_finite(model_output) is None,
         output_type=type(model_output).__name__,
         output_type_kept=type(dag_output) is type(model_output),
         converts_exactly=max(difference, second_difference) <= CONVERSION_TOLERANCE)
    return dag, second


_SPECIALISED = "the DAG runs only where"  # dagprune's run-time check of a size the model made a number


def _second_input_difference(model, dag, second: dict, note) -> tuple[float, dict | None]:
    """The DAG's difference from the model on the second input; 0 and None when the DAG refuses
    its sizes with dagprune's clear error (the model turned a size into a Python number, as in a
    recurrent scan's ``range(seq_len)``), noted as ``other_sizes`` False."""
    import dagprune as dp
    try:
        difference = float(dp.compare_module_outputs(model, dag, example_inputs=second, raise_error=False))
    except AssertionError as error:
        if _SPECIALISED not in str(error):
            raise
        note(other_sizes=False, other_sizes_error=first_line(error))
        return 0.0, None
    note(other_sizes=True)
    return difference, second


def _check_roundtrip(dag, inputs: dict, note) -> None:
    """Notes whether the saved DAG loads bit-exactly without transformers; when it does not,
    the error, and whether it does in this process (where transformers is imported)."""
    try:
        roundtrip_exact, loaded_type = round_trips_without_transformers(dag, inputs)
        note(roundtrip_exact=roundtrip_exact, loaded_output_type=loaded_type)
        return
    except Exception as error:  # noqa: BLE001 - recorded; the pruning stages do not need it
        note(roundtrip_exact=False, roundtrip_error=first_line(error),
             roundtrip_traceback=getattr(error, "child_traceback", None)
             or short_traceback(traceback.format_exc()))
    try:
        note(roundtrip_with_transformers_exact=round_trips_in_process(dag, inputs))
    except Exception as error:  # noqa: BLE001 - recorded
        note(roundtrip_with_transformers_exact=False, roundtrip_with_transformers_error=first_line(error))


def _find_groups(dag, inputs: dict, note) -> bool:
    """Notes the channel groups; whether one is prunable."""
    from dagprune_algorithms.pruning import find_channel_groups
    analysis = find_channel_groups(dag, example_inputs=inputs)
    prunable = [group for group in analysis.groups if group.prunable]
    reasons = collections.Counter(group.reason.split(": ", 1)[-1][:120]  # without the vertex name
                                  for group in analysis.groups if not group.prunable)
    note(channel_groups=len(analysis.groups), prunable_groups=len(prunable), prunable=bool(prunable),
         unprunable_reasons=[f"{count} x {reason}" for reason, count in reasons.most_common(3)])
    return bool(prunable)


def _prepare_pruning(dag, inputs: dict, note):
    """``ChannelPruning`` at 50% of the FLOPs, or halfway to the reachable share; gated DAG."""
    from removal_check import prepare_at_target_or_reachable
    pruning, gated, target = prepare_at_target_or_reachable(dag, None, PRUNING_TARGET, 10, example_inputs=inputs)
    note(pruning_target=target, prunable_proportion=float(pruning.prunable_proportion),
         max_removable_proportion=float(pruning.max_removable_proportion))
    return pruning, gated


def _compute_flops(dag, inputs: dict) -> int:
    from dagprune_algorithms.pruning import compute_flops
    return compute_flops(dag, example_inputs=inputs)


def _check_removal(pruning, gated, inputs: dict, second: dict | None, seed: int, note) -> None:
    """Random gates, slim model; its differences from the gated model on both inputs (the example
    alone where ``second`` is None), its FLOPs."""
    import torch
    from removal_check import removal_difference_at_random_gates

    import dagprune as dp
    difference, slim, _ = removal_difference_at_random_gates(pruning, gated, None, 0, seed + 1,
                                                             example_inputs=inputs)
    note(removal_max_rel_diff=difference)
    with torch.no_grad():
        second_difference = 0.0 if second is None else float(dp.max_relative_difference(gated(**second),
                                                                                         slim(**second)))
    note(removal_second_max_rel_diff=second_difference,
         removal_exact=max(difference, second_difference) <= REMOVAL_TOLERANCE,
         slim_params=sum(p.numel() for p in slim.parameters()))
    note(slim_flops=int(_compute_flops(slim, inputs)))


def round_trips_without_transformers(dag, inputs: dict) -> tuple[bool, str]:
    """Whether the saved DAG loads bit-exactly in a process that cannot import transformers;
    and the class name of the loaded DAG's output."""
    loaded = load_in_fresh_process(dag, kwargs=inputs, library="transformers", block=True,
                                   temp_prefix="dagprune-hf-")
    if loaded.exact is None:
        raise LoadFailure("loading without transformers: " + last_line(loaded.stderr),
                          short_traceback(loaded.stderr))
    if not loaded.exact:
        raise AssertionError(f"the loaded DAG differs from the saved one ({loaded.verdict})")
    return True, loaded.output_type


class LoadFailure(RuntimeError):
    """Loading failed in the fresh process; ``child_traceback``: the end of its traceback."""

    def __init__(self, message: str, child_traceback: str):
        super().__init__(message)
        self.child_traceback = child_traceback


def round_trips_in_process(dag, inputs: dict) -> bool:
    """Whether the saved DAG, loaded in this process, computes bit-equal outputs and state."""
    import torch

    import dagprune as dp
    with tempfile.TemporaryDirectory(prefix="dagprune-hf-") as folder:
        loaded = dp.load_dag(dag.save(Path(folder) / "dag")).eval()
    with torch.no_grad():
        same_output, same_state = compare_bit_for_bit(dag.eval()(**inputs), loaded(**inputs),
                                                      dag.state_dict(), loaded.state_dict())
    return same_output and same_state


# ---------------------------------------------------------------------------------- the sweep
def _error_fields(error: BaseException, record: dict) -> dict:
    return {"error": first_line(error), "failed_stage": record.get("stage"),
            "traceback": short_traceback(traceback.format_exc())}


def sweep(names: list[str], results: Path, timeout: float) -> None:
    sweep_harness.sweep(names, results, lambda name: run_in_subprocess(
        __file__, name, timeout, "dagprune-hf-record-", record_failed_stage=True))


# ---------------------------------------------------------------------------------- the table
def _problems(record: dict) -> list[str]:
    """Every check of ``record`` that did not hold, the stage first: errors, then differences."""
    problems = []
    if record.get("error"):
        problems.append(f"{record.get('failed_stage')}: {record['error']}")
    if record.get("roundtrip_error"):
        with_transformers = {True: "bit-exact", False: "**not** bit-exact", None: "not checked"}[
            record.get("roundtrip_with_transformers_exact")]
        problems.append(f"roundtrip: {record['roundtrip_error']} (loaded with transformers "
                        f"imported: {with_transformers})")
    if record.get("converts_exactly") is False:
        problems.append(f"convert: output differs by {record['convert_max_rel_diff']:.1e} "
                        f"(second input {record.get('second_max_rel_diff', float('nan')):.1e})")
    if record.get("output_type_kept") is False:
        problems.append(f"convert: the DAG does not return {record.get('output_type')}")
    if record.get("prunable") is False:
        problems.append("groups: no prunable group: " + "; ".join(record.get("unprunable_reasons", [])))
    if record.get("removal_exact") is False:
        problems.append(f"remove: slim differs by {record['removal_max_rel_diff']:.1e} (second "
                        f"input {record.get('removal_second_max_rel_diff', float('nan')):.1e})")
    return problems


_DESCRIPTION = (
    "Written by `scripts/coverage_transformers.py`: each class built from a tiny config (random "
    "weights, eval mode; `scripts/transformers_tiny_models.py`), called with keyword inputs "
    "(`input_ids` and an `attention_mask` padding one row, `use_cache=False` for decoders, "
    "`decoder_input_ids` for encoder-decoders; `input_values` waveforms for audio encoders; "
    "`input_features` and `decoder_input_ids` for Whisper; token IDs and `pixel_values` for CLIP; "
    "`pixel_values` for vision). Convert: output within 1e-5 (relative) of the original on the "
    "example and on a second input of another batch size (text: another length and padding; "
    "waveforms: another length); other sizes: \"no\" where the DAG refuses the second input's sizes with "
    "dagprune's clear error (the model turns a size into a Python number, as in a recurrent scan over the "
    "tokens: the DAG is specialised on the example's sizes; its other checks then use the example alone). "
    "Save/load: the saved DAG loads in a fresh process where `import transformers` fails, "
    "bit-exact. Prunable: a prunable channel group. Removal: slim model within 1e-4 of the gated "
    "model under random gates (both inputs). FLOPs per sample on the example, before and after "
    "removal.")
_HEADER = ("| model | kind | params | convert | other sizes | save/load | prunable | prunable proportion "
           "| max removable | removal | FLOPs (K) | slim FLOPs (K) | failure |")


def write_table(results: Path, table: Path, note: str = "") -> None:
    records = read_records(results)

    def count(key: str) -> int:
        return sum(bool(r.get(key)) for r in records.values())

    def number(record: dict, key: str, form: str) -> str:
        return form.format(record[key]) if record.get(key) is not None else "-"

    specialised = sum(r.get("other_sizes") is False for r in records.values())
    summary = (f"**{count('converts_exactly')} of {len(records)} convert, {count('roundtrip_exact')} "
               f"save/load, {count('prunable')} prunable, {count('removal_exact')} removal-exact** "
               f"({specialised} of them only at the example's sizes){(' ' + note) if note else ''}")
    lines = ["# Hugging Face transformers models", "", _DESCRIPTION, "", summary, "", _HEADER,
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(records, key=lambda n: (records[n].get("kind", ""), n)):
        r = records[name]
        lines.append(
            f"| {name} | {r.get('kind', '-')} | {number(r, 'params', '{:,}')} | "
            f"{mark(r.get('converts_exactly'))} | {mark(r.get('other_sizes'))} | {mark(r.get('roundtrip_exact'))} | "
            f"{mark(r.get('prunable'))} | {number(r, 'prunable_proportion', '{:.3f}')} | "
            f"{number(r, 'max_removable_proportion', '{:.3f}')} | {mark(r.get('removal_exact'))} | "
            f"{_kilo(r.get('flops'))} | {_kilo(r.get('slim_flops'))} | "
            f"{escape('; '.join(_problems(r)))[:200]} |")
    lines += _failure_section(records) + _partly_prunable_section(records)
    table.write_text("\n".join(lines) + "\n")


def _kilo(value) -> str:
    return "-" if value is None else f"{value / 1e3:,.0f}"


def _failure_section(records: dict) -> list[str]:
    """One entry per failing model: each problem and the last lines of its traceback."""
    failing = {name: r for name, r in sorted(records.items()) if _problems(r)}
    lines = ["", "## Failures", ""]
    if not failing:
        return lines + ["None."]
    for name, r in failing.items():
        lines += [f"### {name}", "", *[f"- {problem}" for problem in _problems(r)]]
        for key in ("traceback", "roundtrip_traceback"):
            if r.get(key):
                lines += ["", "```", *r[key].splitlines()[-8:], "```"]
        lines.append("")
    return lines


def _partly_prunable_section(records: dict) -> list[str]:
    """Models with groups left unprunable for a reason other than reaching the model's output."""
    lines = ["", "## Groups left unprunable", "",
             ("Not failures: the most common reasons why channel groups other than those reaching "
              "the model's output are not prunable (`N x reason`)."), ""]
    for name, r in sorted(records.items()):
        reasons = [reason for reason in r.get("unprunable_reasons", []) if "model output" not in reason]
        if reasons and r.get("prunable"):
            lines.append(f"- {name} ({r.get('prunable_groups')} of {r.get('channel_groups')} groups "
                         f"prunable): {'; '.join(reasons)}")
    return lines


def main() -> None:
    if sweep_harness.child_main(check_model, _error_fields):
        return
    args = sweep_harness.parse_sweep_arguments(
        __doc__.split("\n\n")[0], results=DEFAULT_RESULTS, table=DEFAULT_TABLE, timeout=300.0,
        models_help="fnmatch patterns of class names")
    if not args.table_only:
        sweep(sweep_harness.matching([*MODELS, *MORE_MODELS], args.models), args.results, args.timeout)
    write_table(args.results, args.table, args.note)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
