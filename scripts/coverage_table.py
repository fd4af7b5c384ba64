"""Builds the supported-models table, its JSON and the failure report from a coverage sweep.

Reads the JSONL written by ``scripts/coverage.py`` (the last record of a name wins) and writes

* ``resources/supported_models_table.md``: the summary over every name of the installed timm
  (models not in the results count as not covered, never as passing) and one row per model;
* ``resources/supported_models.json``: the same summary and every record;
* ``resources/coverage_failures.md``: failing models grouped by cause (the first error line with
  numbers blanked, so shape errors of one kind fall together), most frequent first.

A model is *convertible* when the DAG's output matches the original within 1e-5 (max relative
difference), and *prunable* when it is convertible, has at least one prunable channel group and
removing the channels closed by random gate logits gives the gated model's output within 1e-4
(or, where float32 rounding is amplified past that, within 1e-9 recomputed in float64).
Skipped, timed-out, out-of-memory and crashed models count as failures.

Usage::

    python scripts/coverage_table.py [--results build/coverage/results.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from sweep_harness import escape, read_records

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "build" / "coverage" / "results.jsonl"
RESOURCES = REPO_ROOT / "resources"
SWEEP_COMMAND = """\
SRC=build/coverage/src_$(git rev-parse --short HEAD)
mkdir -p $SRC && git archive HEAD dagprune dagprune_algorithms | tar -x -C $SRC
git rev-parse --short HEAD > $SRC/COMMIT
for i in 0 1; do nice -n 15 python scripts/coverage.py --source $SRC --shard $i/2 & done; wait
python scripts/coverage_table.py"""
TORCH_DAG_FIGURES = {"timm": "0.9.5", "all": 945, "convertible": 690, "prunable": 585}
"""torch-dag's published supported-models summary (their figures, not re-run here)."""


def load_records(path: Path) -> dict[str, dict]:
    records = read_records(path, tolerant=True)  # lines cut by an interruption are skipped
    for record in records.values():
        record.pop("traceback", None)
    return records


def is_convertible(record: dict) -> bool:
    """Converts exactly and the DAG saves and loads bit-exactly."""
    return bool(record.get("converts_exactly")) and bool(record.get("roundtrip_exact"))


def is_prunable(record: dict) -> bool:
    """Convertible, prunable, exact removal, and the slim model saves and loads bit-exactly."""
    return is_convertible(record) and bool(record.get("prunable")) and bool(record.get("removal_exact")) \
        and bool(record.get("slim_roundtrip_exact"))


MEANINGFUL_SHARE = 0.5
"""A model is *meaningfully prunable* when removing channels can take away at least this share
of its FLOPs (``max_removable_proportion``)."""


def is_meaningfully_prunable(record: dict) -> bool:
    """Prunable, and at least :data:`MEANINGFUL_SHARE` of its FLOPs removable."""
    return is_prunable(record) and (record.get("max_removable_proportion") or 0.0) >= MEANINGFUL_SHARE


def failure_cause(record: dict) -> str | None:
    """Why ``record`` is not prunable-with-exact-removal (None when it is)."""
    if is_prunable(record):
        return None
    if record.get("status") != "ok":
        stage = record.get("error_stage") or record.get("stage")
        error = record.get("error", "unknown error")
        if record["status"] == "skipped":
            return "skipped: too many parameters for the memory bound"
        if record["status"] in ("timeout", "oom", "crashed"):
            return f"{record['status']}: {re.sub(r'in stage .*', f'in stage {stage}', error)}"
        return f"[{stage}] {error}"
    if not record.get("converts_exactly"):
        return "[convert] output differs from the original by more than 1e-5"
    if not record.get("roundtrip_exact"):
        return "[roundtrip] the loaded DAG is not bit-exact (or the record predates the check)"
    if not record.get("removal_exact"):
        return "[remove] removed-channel output differs from the gated model by more than 1e-4 (1e-9 in float64)"
    return "[slim roundtrip] the loaded slim model is not bit-exact"


def cause_key(cause: str) -> str:
    """Blanks numbers and quoted names so that one kind of error groups together."""
    cause = re.sub(r"<?/tmp/[^\s>]*>?", "…", cause)  # temporary file names
    cause = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", cause)
    cause = re.sub(r"'[^']*'", "'…'", cause)
    return cause


def _percent(count: int, total: int) -> float:
    return round(100 * count / total, 1) if total else 0.0


def summarize(records: dict[str, dict], all_names: list[str], timm_version: str) -> dict:
    covered = [records[n] for n in all_names if n in records]
    statuses = collections.Counter(r["status"] for r in covered)
    total = len(all_names)
    convertible = sum(map(is_convertible, covered))
    prunable = sum(map(is_prunable, covered))
    meaningful = sum(map(is_meaningfully_prunable, covered))
    theirs = TORCH_DAG_FIGURES
    return {
        "timm_version": timm_version,
        "torch_version": next((r.get("torch_version") for r in covered), None),
        "all": total,
        "covered": len(covered),
        "not_covered": total - len(covered),
        "convertible": convertible,
        "convertible_percent": _percent(convertible, total),
        "prunable": prunable,
        "prunable_percent": _percent(prunable, total),
        "meaningfully_prunable": meaningful,
        "meaningfully_prunable_percent": _percent(meaningful, total),
        "meaningfully_prunable_percent_of_run": _percent(meaningful, len(covered)),
        "convertible_percent_of_run": _percent(convertible, len(covered)),
        "prunable_percent_of_run": _percent(prunable, len(covered)),
        "statuses": dict(sorted(statuses.items())),
        "converted_with_example_inputs": sum(bool(r.get("converted_with_example_inputs")) for r in covered),
        "code_versions": dict(collections.Counter(
            f"{r.get('git_head')}{' (dirty tree)' if r.get('source_dirty') else ''}" for r in covered)),
        "torch_dag": {**theirs, "convertible_percent": _percent(theirs["convertible"], theirs["all"]),
                      "prunable_percent": _percent(theirs["prunable"], theirs["all"])},
    }


def _number(value, digits=3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}"


def _difference(value) -> str:
    return "" if value is None else f"{value:.1e}"


def _size(record: dict) -> str:
    size = record.get("input_size")
    if not size:
        return ""
    return f"{size[1]}x{size[2]}" + (" (img_size)" if record.get("img_size_rebuilt") else "")


def _mark(flag: bool) -> str:
    return "yes" if flag else "no"


def render_table(summary: dict, records: dict[str, dict], all_names: list[str]) -> str:
    s, theirs = summary, summary["torch_dag"]
    lines = [
        "# Supported timm models",
        "",
        "Generated by `scripts/coverage_table.py` from a real run of `scripts/coverage.py`; do not "
        "edit by hand. Commands (the sweep runs on a `git archive` snapshot of a commit, so that "
        "edits made to the tree meanwhile do not leak into its rows; it resumes where it stopped):",
        "",
        "```sh",
        SWEEP_COMMAND,
        "```",
        "",
        f"timm {s['timm_version']}, torch {s['torch_version']}, every name of `timm.list_models()` "
        "built with `pretrained=False`, run on CPU at 64x64 where the model allows (fixed-size "
        "models rebuilt with `img_size`; otherwise the smallest of min_input_size / 128 / default "
        "that runs), one forked process per model bounded to 120 s of CPU time, 900 s of wall-clock "
        "time and 6 GB of address space beyond the parent's; models over 250M parameters run one "
        "at a time (no other shard's model beside them) under 18 GB, 4x those time bounds and with "
        "the DAG sharing the model's weights (`copy_model=False`); models over 1.4B parameters, "
        "which do not fit this 24 GB machine, are skipped. A model holding blocks that tracing "
        "follows only with example inputs (`dagprune.tracing.needs_example_inputs`) is converted "
        f"with an example batch, as the CLI converts it ({s.get('converted_with_example_inputs', 0)} "
        "models of the run).",
        "",
        "* **convertible**: the DAG's output equals the model's within 1e-5 (max relative difference), "
        "and the DAG saved and loaded back gives bit-identical outputs and tensors.",
        "* **prunable**: convertible, at least one prunable channel group, removing the channels "
        "closed by random gate logits reproduces the gated model's output within 1e-4, and the slim "
        "model saved and loaded back is bit-identical. Where the float32 difference is over 1e-4, both "
        "models are recomputed in float64 and must agree within 1e-9: random-init weights can amplify "
        "float32 rounding (squeeze-excitation logits in the thousands), while a wrong removal stays "
        "far above 1e-9 in float64.",
        f"* **meaningfully prunable**: prunable, and removing channels can take away at least "
        f"{MEANINGFUL_SHARE:.0%} of its FLOPs (`max_removable_proportion` >= {MEANINGFUL_SHARE}); a model "
        "where one small group is removable is prunable but not meaningfully so.",
        "* Skipped, timed-out, out-of-memory and crashed models, and models not covered by the run, "
        "count as failures.",
        "",
        "## Summary",
        "",
        "| | timm | models | convertible | prunable (exact removal) | meaningfully prunable |",
        "|---|---|---:|---:|---:|---:|",
        f"| dagprune (this run) | {s['timm_version']} | {s['all']} | {s['convertible']} "
        f"({s['convertible_percent']}%) | {s['prunable']} ({s['prunable_percent']}%) | "
        f"{s['meaningfully_prunable']} ({s['meaningfully_prunable_percent']}%) |",
        f"| torch-dag (their published figures) | {theirs['timm']} | {theirs['all']} | "
        f"{theirs['convertible']} ({theirs['convertible_percent']}%) | {theirs['prunable']} "
        f"({theirs['prunable_percent']}%) | - |",
        "",
        f"Covered by the run: {s['covered']} of {s['all']} models"
        + (f" ({s['not_covered']} not run, counted as failures)." if s["not_covered"] else ".")
        + " Outcomes: " + ", ".join(f"{k} {v}" for k, v in s["statuses"].items()) + ".",
        f"Of the {s['covered']} models run, {s['convertible']} ({s['convertible_percent_of_run']}%) are "
        f"convertible, {s['prunable']} ({s['prunable_percent_of_run']}%) prunable and "
        f"{s['meaningfully_prunable']} ({s['meaningfully_prunable_percent_of_run']}%) meaningfully "
        "prunable; the models not "
        "run are not counted as passing anywhere. The sweep visits the names in a fixed hash "
        "order, so a partial run is an unbiased sample of the zoo, not its first letters.",
        "Rows per dagprune commit they ran on: "
        + ", ".join(f"`{k}` {v}" for k, v in s["code_versions"].items()) + ".",
        "Failures grouped by cause: [coverage_failures.md](coverage_failures.md).",
        "",
        "FLOPs are ours (2 x multiply-accumulates of conv / linear / matmul / attention, batch 1) at "
        "the input size shown; *ours/fvcore* divides them by 2 x fvcore's conv / linear / matmul / "
        "bmm / addmm / einsum counts (fvcore skips `scaled_dot_product_attention`, so attention "
        "models read above 1).",
        "",
        "## Models",
        "",
        "| model | outcome | input | params (M) | convertible (max rel diff) | save/load bit-exact "
        "(DAG / slim) | prunable groups | prunable proportion | max removable | removal exact (max rel "
        "diff) | GFLOPs | ours/fvcore | time (s) | error |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name in all_names:
        record = records.get(name)
        if record is None:
            lines.append(f"| {name} | not run | | | | | | | | | | | | |")
            continue
        converts = f"{_mark(is_convertible(record))} ({_difference(record.get('convert_max_rel_diff'))})" \
            if "convert_max_rel_diff" in record else "no"
        removal = f"{_mark(bool(record.get('removal_exact')))} " \
                  f"({_difference(record.get('removal_max_rel_diff'))})" \
            if "removal_max_rel_diff" in record else "no"
        round_trips = " / ".join(_mark(bool(record[key])) if key in record else "-"
                                 for key in ("roundtrip_exact", "slim_roundtrip_exact"))
        flops = record.get("flops")
        params = record.get("params")
        lines.append(" | ".join([
            f"| {name}", record["status"], _size(record),
            _number(params / 1e6 if params else None, 1), converts, round_trips,
            str(record.get("prunable_groups", "")), _number(record.get("prunable_proportion")),
            _number(record.get("max_removable_proportion")), removal,
            _number(flops / 1e9 if flops else None), _number(record.get("flops_ratio")),
            _number(record.get("time_s"), 1), escape(record.get("error", "")[:160]) + " |"]))
    return "\n".join(lines) + "\n"


def render_failures(summary: dict, records: dict[str, dict], all_names: list[str]) -> str:
    groups: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for name in all_names:
        record = records.get(name)
        cause = "not run (outside the sweep that produced these results)" if record is None \
            else failure_cause(record)
        if cause is not None:
            groups[cause_key(cause)].append((name, cause))
    failing = sum(len(v) for v in groups.values())
    lines = [
        "# Coverage failures",
        "",
        f"Generated by `scripts/coverage_table.py` (timm {summary['timm_version']}): the "
        f"{failing} of {summary['all']} models that are not convertible-and-prunable, grouped by "
        "the first line of their error (numbers and quoted names blanked), most frequent first. "
        "`[stage]` is where the check stopped: build, convert, flops, prune, remove.",
        "",
        "| # | models | cause |",
        "|---:|---:|---|",
    ]
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    for index, (key, members) in enumerate(ordered, 1):
        lines.append(f"| {index} | {len(members)} | {escape(key[:200])} |")
    for index, (key, members) in enumerate(ordered, 1):
        lines += ["", f"## {index}. {escape(key[:200])} ({len(members)})", "",
                  f"Example: `{members[0][0]}`: {escape(members[0][1][:400])}", "",
                  ", ".join(f"`{name}`" for name, _ in members)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, default=RESOURCES, help="folder for the three files")
    args = parser.parse_args(argv)

    import timm

    records = load_records(args.results)
    all_names = sorted(timm.list_models())
    versions = {r.get("timm_version") for r in records.values()}
    if versions - {timm.__version__}:
        print(f"warning: results from timm {sorted(versions)}, installed {timm.__version__}", file=sys.stderr)
    unknown = sorted(set(records) - set(all_names))
    if unknown:
        print(f"warning: {len(unknown)} results for names the installed timm lacks, ignored", file=sys.stderr)
    summary = summarize(records, all_names, timm.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "supported_models_table.md").write_text(render_table(summary, records, all_names))
    (args.out / "coverage_failures.md").write_text(render_failures(summary, records, all_names))
    payload = {"summary": summary, "models": [records[n] for n in all_names if n in records]}
    (args.out / "supported_models.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
