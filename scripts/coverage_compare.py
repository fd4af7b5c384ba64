"""Compares a coverage sweep of some models (``scripts/coverage.py --models ...``) with the
committed table: per model, ``max_removable_proportion`` before and after, and the checks.

    python scripts/coverage_compare.py --after build/coverage/low/results.jsonl \\
        --out resources/sweep_below_09_867c2c9/comparison.md

``--before`` is a table's JSON (``resources/supported_models.json``, the default) or another
sweep's JSONL. Only models in both are compared; a model whose last record failed counts as
failing after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("converts_exactly", "roundtrip_exact", "removal_exact", "slim_roundtrip_exact")


def latest_records(path: Path) -> dict[str, dict]:
    """The last record of every model in a sweep's JSONL file."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["name"]] = record
    return records


def _share(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison(before: dict[str, dict], after: dict[str, dict]) -> tuple[list[str], dict]:
    """The table's rows and the counts."""
    rows, counts = [], {"models": 0, "raised": 0, "lowered": 0, "all_checks": 0, "failed": 0,
                        ">= 0.5": 0, ">= 0.9": 0, "before >= 0.5": 0, "before >= 0.9": 0}
    for name in sorted(set(before) & set(after)):
        old, new = before[name].get("max_removable_proportion"), after[name].get("max_removable_proportion")
        checks = [after[name].get(check) for check in CHECKS]
        failed = bool(after[name].get("error")) or new is None
        counts["models"] += 1
        counts["failed"] += failed
        counts["all_checks"] += not failed and all(checks)
        for label, share in (("", new), ("before ", old)):
            for bound in (0.5, 0.9):
                counts[f"{label}>= {bound}"] += share is not None and share >= bound
        if old is not None and new is not None:
            counts["raised"] += new > old + 0.005
            counts["lowered"] += new < old - 0.005
        verdict = "failed: " + str(after[name].get("error", ""))[:80] if failed else \
            ("all exact" if all(checks) else f"checks {checks}")
        rows.append(f"| {name} | {_share(old)} | {_share(new)} | {verdict} |")
    return rows, counts


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else path.name


def _before_records(path: Path) -> tuple[dict[str, dict], str]:
    """The records to compare against and their commits: a table's JSON, or a sweep's JSONL."""
    if path.suffix == ".jsonl":
        records = latest_records(path)
        return records, ", ".join(sorted({str(r.get("git_head")) for r in records.values()}))
    table = json.loads(path.read_text())
    commits = ", ".join(table.get("summary", {}).get("code_versions", {})) or "its commit"
    return {row["name"]: row for row in table["models"]}, commits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=REPO_ROOT / "resources" / "supported_models.json")
    parser.add_argument("--after", type=Path, required=True, help="JSONL of the new sweep")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    options = parser.parse_args(argv)
    before, before_commits = _before_records(options.before)
    after = latest_records(options.after)
    rows, counts = comparison(before, after)
    commits = sorted({str(record.get("git_head")) for record in after.values()})
    lines = [f"# Coverage sweep of {counts['models']} models against an earlier one",
             "", f"Before: `{_shown(options.before)}` (commit {before_commits}); "
             f"after: commit {', '.join(commits)} (`{_shown(options.after)}`). `max_removable_proportion` "
             "at the sweep's input sizes; checks: conversion, save/load, removal and the slim "
             "model's save/load, each exact.", "",
             f"- models: {counts['models']}; every check passed: {counts['all_checks']}; failed: {counts['failed']}",
             f"- raised by more than 0.005: {counts['raised']}; lowered: {counts['lowered']}",
             f"- at or above 0.5 removable: {counts['before >= 0.5']} before, {counts['>= 0.5']} after",
             f"- at or above 0.9 removable: {counts['before >= 0.9']} before, {counts['>= 0.9']} after",
             "", "| model | before | after | checks |", "|---|---:|---:|---|", *rows, ""]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(lines))
    print("\n".join(lines[:9]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
