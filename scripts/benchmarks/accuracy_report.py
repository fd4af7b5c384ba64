"""Section 4 of the benchmark report: accuracy against FLOPs and latency, and its target check.

The target (issue 19): at 0.5 of the FLOPs, dagprune differentiable with distillation within
:data:`WITHIN_BASELINE` points of the converged baseline, and at every target more accurate
than every other method by more than the seed spread. Both are computed here from the numbers
of ``accuracy.json``; where a part is not met the report says which method, target and margin.
Comparisons are paired by seed: every method of a seed starts from that seed's baseline, so
the margin of a seed is our accuracy minus the other method's on it. The spread of a comparison
is the sample standard deviation of those per-seed margins; ours is ahead by more than the
spread when it is ahead on every seed and the mean margin exceeds that deviation.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from pathlib import Path

from .plots import figure

FORMAT = 2
"""The ``accuracy.json`` version this module reads (see ``accuracy.FORMAT``)."""

WITHIN_BASELINE = 1.0
"""Points below the baseline that dagprune with distillation may lose at :data:`CHECKED_TARGET`."""

CHECKED_TARGET = 0.5
"""The FLOPs target of the baseline check."""

FLOPS_SLACK = 0.02
"""A method whose FLOPs share exceeds its target by more than this did not reach the target."""

LATENCY_TOLERANCE = 0.05
"""Relative distance to its target within which a ``--budget latency`` run's measured share
counts as reaching it."""

PLOTTED_LATENCY = "1t_b32"
"""The latency setting of the accuracy-against-latency plot."""


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_spread(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.{digits}f} ± {_spread(values):.{digits}f}"


@dataclasses.dataclass
class MethodAtTarget:
    """The runs of one method at one target, over seeds."""

    label: str
    key: str
    budget: str
    target: float
    runs: list
    failures: list

    def values(self, field: str) -> list[float]:
        return [r[field] for r in self.runs if r.get(field) is not None]

    def latency(self, setting: str, field: str = "latency_ms") -> list[float]:
        return [r[field][setting] for r in self.runs if setting in r.get(field, {})]

    @property
    def accuracy(self) -> float | None:
        return _mean(self.values("accuracy"))

    @property
    def spread(self) -> float:
        return _spread(self.values("accuracy"))

    @property
    def flops(self) -> float | None:
        return _mean(self.values("flops_proportion"))


def _group(rows: list[dict]) -> dict[tuple[str, float], MethodAtTarget]:
    grouped: dict = {}
    for row in rows:
        key = (row["method_key"], row["target"])
        if key not in grouped:
            grouped[key] = MethodAtTarget(row["method"], row["method_key"], row["budget"], row["target"], [], [])
        (grouped[key].failures if row.get("error") else grouped[key].runs).append(row)
    return grouped


def _baseline_by_seed(section: dict) -> dict[int, float]:
    return {b["seed"]: b["accuracy"] for b in section["baselines"]}


def _paired_drop(group: MethodAtTarget, baseline: dict[int, float]) -> list[float]:
    """Per seed: the method's accuracy minus its own seed's baseline (points)."""
    return [r["accuracy"] - baseline[r["seed"]] for r in group.runs if r.get("accuracy") is not None]


def accuracy_section(section: dict, plots: Path, lines: list, verdicts: list) -> None:
    """Appends section 4 (text, tables, plots) to ``lines`` and its target checks to ``verdicts``."""
    lines += ["## 4. Accuracy against FLOPs and latency", ""]
    if section.get("format") != FORMAT:
        lines += ["accuracy.json was written by an older version of the benchmark; rerun "
                  "`python scripts/benchmark.py --sections accuracy`.", ""]
        verdicts.append("Accuracy targets: not checked (accuracy.json of an older format)")
        return
    groups = _group(section["results"])
    baseline = _baseline_by_seed(section)
    settings = section["measurements"]["settings"]
    _setup_lines(section, lines)
    _baseline_lines(section, plots, lines)
    _results_table(groups, baseline, settings, lines)
    _accuracy_plots(groups, section, plots, lines)
    _target_check(groups, section, baseline, lines, verdicts)
    _latency_target_check(groups, section, lines, verdicts)
    _timing_lines(section, groups, lines)


def _setup_lines(section: dict, lines: list) -> None:
    setup = section["setup"]
    shape = "x".join(map(str, setup["input_shape"]))
    data = section["baselines"][0]["data"]
    lines += [f"{setup['model']} (timm, `pretrained=False`) on {data} ({section['baselines'][0]['train_images']:,} "
              f"training images after the selection split, {section['baselines'][0]['val_images']:,} validation "
              f"images), input {shape} (grey images replicated to 3 channels by dagprune's data reader); seeds "
              f"{setup['seeds']}, {setup['threads']} torch thread(s).", "",
              f"Every method starts from its seed's {_baseline_word(section)} baseline and gets the same budget: {setup['steps']} "
              f"steps at lr {setup['lr']:g} (Adam) during which it prunes, then {setup['finetune_steps']} "
              f"fine-tuning steps at lr {setup['lr'] / 10:g}, batch {setup['batch_size']}, the same batches for "
              "every method. dagprune runs through the `dagprune prune` job (`--method dag` trains gates with "
              "the FLOPs loss over all pruning steps; `--distill on` adds logit distillation from the baseline "
              "in both phases; `--method l1` and Torch-Pruning prune "
              f"{setup['prune_times']} times, every {setup['step_epoch']} steps from step 0, the same share of "
              "every group's channels)."
              + (" Torch-Pruning's methods are its `BasePruner` with `MagnitudeImportance(p=1)`, `GroupNormPruner` "
                 "with `GroupMagnitudeImportance(p=2)` and `BasePruner` with `TaylorImportance()` (gradients "
                 "summed over the steps since the previous prune), `iterative_steps` as above, local pruning "
                 "to the channel ratio whose FLOPs share is at or just below the target, classifier ignored; "
                 "Adam restarts after each prune (pruning replaces the parameters); no distillation."
                 if any(key.startswith("tp_") for key in setup["methods"]) else "")
              + " Accuracy, FLOPs (`dagprune.count_flops`) and latency of every pruned model are measured alike "
              "after all training (every tool's model saved as a dagprune DAG). Mean ± sample standard deviation "
              "over seeds."]
    if setup["latency_budget_methods"]:
        table = setup.get("latency_table") or {}
        lines += ["", f"{', '.join(setup['latency_budget_methods'])}: `--budget latency`, the target a share of "
                  f"the latency predicted by the latency table (batch {table.get('batch_size', 32)}, timed at "
                  f"{table.get('threads', '?')} thread(s); fit error {table.get('fit_error', float('nan')):.3f} after "
                  f"{table.get('attempts', '?')} measurement(s)); it is not at equal FLOPs and is left out of the "
                  "FLOPs comparison below."]
    lines += [f"Note: {note}" for note in setup["notes"]] + [""]


def _capped_seeds(section: dict) -> list:
    """The seeds whose baseline training stopped at a step cap in some phase (not converged)."""
    return [b["seed"] for b in section["baselines"] if not all(p["plateaued"] for p in b["phases"])]


def _baseline_word(section: dict) -> str:
    """How the report names the baselines: "converged" only when every phase of every seed plateaued."""
    return "step-capped (not converged)" if _capped_seeds(section) else "converged"


def _baseline_lines(section: dict, plots: Path, lines: list) -> None:
    rule = section["setup"]["baseline_rule"]
    lines += [f"Baseline: trained at lr {section['setup']['lr']:g}, evaluated every {rule['eval_every']} steps on "
              f"{rule['selection_images']:,} training images held out for the purpose; a phase ends after "
              f"{rule['patience']} evaluations without an improvement of more than {rule['min_delta']} points "
              f"(or at its cap: {rule['max_steps']} steps, then {rule['decay_max_steps']} at lr / "
              f"{section['setup']['lr_decay']:g} from the best weights); the best weights are the baseline.", "",
              "| seed | steps trained | phases (steps, plateaued) | best at step | selection % | validation % |",
              "|---:|---:|---|---:|---:|---:|"]
    for b in section["baselines"]:
        phases = "; ".join(f"{p['steps']} at lr {p['lr']:g}, {'yes' if p['plateaued'] else 'NO (cap)'}"
                           for p in b["phases"])
        lines.append(f"| {b['seed']} | {b['steps']} | {phases} | {b['best_step']} | "
                     f"{b['selection_accuracy']:.2f} | {b['accuracy']:.2f} |")
    accuracies = [b["accuracy"] for b in section["baselines"]]
    capped = _capped_seeds(section)
    lines += ["", f"Baseline validation accuracy {_mean_spread(accuracies)} %; "
              + ("every phase of every seed plateaued." if not capped else
                 f"NOT converged by the rule for seed(s) {capped}: a phase stopped at its step cap."), ""]
    path = plots / "benchmark_accuracy_baseline.png"
    with figure(path, (6, 4), "training step", "selection accuracy (%)") as axis:
        for b in section["baselines"]:
            points = [(r["total_step"], r["selection_accuracy"]) for r in b["curve"]]
            axis.plot(*zip(*points), marker=".", label=f"seed {b['seed']}")
    lines += [f"![baseline training]({plots.name}/{path.name})", ""]


def _results_table(groups: dict, baseline: dict[int, float], settings: list[str], lines: list) -> None:
    lines += ["| method | target | FLOPs share | top-1 % | vs baseline (points) | before fine-tuning % | "
              + " | ".join(f"latency {s.replace('_', ' ')} ms (share)" for s in settings)
              + " | params (M) | runs | failures |",
              "|---|---:|---:|---:|---:|---:|" + "---:|" * len(settings) + "---:|---:|---|"]
    for (_, target), group in sorted(groups.items(), key=lambda item: (-item[0][1], item[1].label)):
        cells = []
        for setting in settings:
            ms, share = group.latency(setting), group.latency(setting, "latency_share")
            cells.append(f"{_mean(ms):.1f} ({_mean(share):.2f})" if ms else "-")
        failures = "; ".join(sorted({r["error"][:70] for r in group.failures}))
        params = group.values("params")
        lines.append(" | ".join([
            f"| {group.label}", str(target), _mean_spread(group.values("flops_proportion"), 3),
            _mean_spread(group.values("accuracy")), _mean_spread(_paired_drop(group, baseline)),
            _mean_spread(group.values("accuracy_before_finetune")), *cells,
            f"{_mean(params) / 1e6:.2f}" if params else "-", str(len(group.runs)),
            f"{len(group.failures)}" + (f": {failures}" if failures else "")]) + " |")
    mismatched = [f"{g.label} @{t} seed {r['seed']}" for (_, t), g in groups.items() for r in g.runs
                  if r.get("accuracy_mismatch")]
    lines += ["", "Latency: median of interleaved runs in eval mode, `torch.inference_mode`, baseline and pruned "
              "models of a seed timed in alternation; share = the median over rounds of pruned / baseline within "
              "a round. 'vs baseline': the accuracy minus the same seed's baseline."]
    if mismatched:
        lines.append(f"The tool's own accuracy differs from the measured one by more than 0.05 points for: "
                     f"{', '.join(mismatched)}.")
    lines.append("")


def _errorbar_series(axis, groups: dict, x_of) -> None:
    by_method = defaultdict(list)
    for group in groups.values():
        x = x_of(group)
        if group.runs and x is not None and group.accuracy is not None:
            by_method[group.label].append((x, group.accuracy, group.spread))
    for label, points in sorted(by_method.items()):
        points.sort()
        axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                      marker="o", capsize=3, label=label)


def _accuracy_plots(groups: dict, section: dict, plots: Path, lines: list) -> None:
    baseline_accuracy = statistics.mean(b["accuracy"] for b in section["baselines"])
    path = plots / "benchmark_accuracy.png"
    with figure(path, (7, 5), "FLOPs share of the baseline", "top-1 accuracy (%)", legend_size=7) as axis:
        _errorbar_series(axis, groups, lambda g: g.flops)
        axis.axhline(baseline_accuracy, color="k", linestyle="--", linewidth=0.8, label="baseline")
    lines += [f"![accuracy vs FLOPs]({plots.name}/{path.name})", ""]
    latencies = [b["latency_ms"][PLOTTED_LATENCY] for b in section["baselines"]
                 if PLOTTED_LATENCY in b.get("latency_ms", {})]
    path = plots / "benchmark_accuracy_latency.png"
    with figure(path, (7, 5), f"measured latency, {PLOTTED_LATENCY.replace('_', ' ')} (ms)", "top-1 accuracy (%)",
                legend_size=7) as axis:
        _errorbar_series(axis, groups, lambda g: _mean(g.latency(PLOTTED_LATENCY)))
        if latencies:
            axis.plot([statistics.mean(latencies)], [baseline_accuracy], "k*", markersize=10, label="baseline")
    lines += [f"![accuracy vs latency]({plots.name}/{path.name})", ""]


def _paired_margins(ours: MethodAtTarget, other: MethodAtTarget) -> list[float]:
    """Per seed that both ran: our accuracy minus the other method's (points). Both start from
    the same baseline of that seed, so the seed's luck cancels out of the difference."""
    theirs = {r["seed"]: r["accuracy"] for r in other.runs if r.get("accuracy") is not None}
    return [r["accuracy"] - theirs[r["seed"]] for r in ours.runs
            if r.get("accuracy") is not None and r["seed"] in theirs]


def _comparison(ours: MethodAtTarget, other: MethodAtTarget) -> tuple[str, bool]:
    """One line comparing ``ours`` with ``other`` at their target, paired by seed, and whether
    ours is ahead by more than the spread: ahead on every seed, and the mean of the per-seed
    margins above their standard deviation (with one seed, any positive margin)."""
    margins = _paired_margins(ours, other)
    if not margins:
        return f"{other.label}: no seed run by both", False
    margin, spread = statistics.mean(margins), _spread(margins)
    ahead = margin > spread and min(margins) > 0
    per_seed = ", ".join(f"{m:+.2f}" for m in margins)
    if ahead:
        verdict = f"ahead by {margin:.2f} points, more than the spread {spread:.2f}"
    elif margin >= 0:
        verdict = f"ahead by {margin:.2f} points, within the spread {spread:.2f}: not separable with these seeds"
    elif -margin <= spread:
        verdict = f"behind by {-margin:.2f} points, within the spread {spread:.2f}"
    else:
        verdict = f"behind by {-margin:.2f} points, more than the spread {spread:.2f}"
    flops_note = ""
    if other.flops is not None and ours.flops is not None and abs(other.flops - ours.flops) > 0.01:
        flops_note = (f" (FLOPs share {ours.flops:.3f} against {other.flops:.3f}: "
                      + ("ours keeps more FLOPs" if ours.flops > other.flops else "ours keeps fewer FLOPs") + ")")
    return f"{other.label}: {verdict} (per seed {per_seed}){flops_note}", ahead


def _target_check(groups: dict, section: dict, baseline: dict[int, float], lines: list, verdicts: list) -> None:
    setup = section["setup"]
    ours_key = next((k for k, label in setup["methods"].items() if label == setup["ours"]), None)
    lines += ["### Target check", ""]
    if ours_key is None:
        lines += [f"{setup['ours']} was not run; nothing to check.", ""]
        verdicts.append(f"Accuracy targets: not checked ({setup['ours']} not run)")
        return
    checked = groups.get((ours_key, CHECKED_TARGET))
    if checked is None or not checked.runs:
        first = f"{setup['ours']} at {CHECKED_TARGET} of the FLOPs within {WITHIN_BASELINE:g} point of the baseline: " \
                "not measured (no run at this target)"
    else:
        drops = _paired_drop(checked, baseline)
        drop = -statistics.mean(drops)
        on_target = checked.flops <= CHECKED_TARGET + FLOPS_SLACK
        met = drop <= WITHIN_BASELINE and on_target
        first = (f"{setup['ours']} at {CHECKED_TARGET} of the FLOPs within {WITHIN_BASELINE:g} point of the "
                 f"{_baseline_word(section)} baseline: {'met' if met else 'MISSED'} ({checked.accuracy:.2f} % against "
                 f"{statistics.mean(baseline[r['seed']] for r in checked.runs):.2f} %, "
                 f"{'a loss' if drop >= 0 else 'a gain'} of {abs(drop):.2f} ± {_spread(drops):.2f} points over "
                 f"{len(drops)} seed(s), FLOPs share {checked.flops:.3f}"
                 + ("" if on_target else f", above the target by more than {FLOPS_SLACK}") + ")")
    lines += [f"- {first}"]
    verdicts.append(first)
    all_ahead, misses = True, []
    for target in sorted({t for (_, t) in groups}, reverse=True):
        ours = groups.get((ours_key, target))
        others = [g for (k, t), g in sorted(groups.items()) if t == target and k != ours_key
                  and g.budget == "flops" and g.runs]
        if ours is None or not ours.runs:
            all_ahead = False
            misses.append(f"{target}: {setup['ours']} has no successful run")
            continue
        lines.append(f"- at {target} ({setup['ours']} {ours.accuracy:.2f} ± {ours.spread:.2f} %, FLOPs share "
                     f"{ours.flops:.3f}):")
        if ours.flops > target + FLOPS_SLACK:
            all_ahead = False
            misses.append(f"{target}: ours above the FLOPs target ({ours.flops:.3f})")
        for other in others:
            text, ahead = _comparison(ours, other)
            lines.append(f"  - {text}")
            if not ahead:
                all_ahead = False
                misses.append(f"{target}: {text}")
    lines += _latency_budget_lines(groups)
    n_seeds = len(section["baselines"])
    second = (f"{setup['ours']} more accurate than every other method at every target by more than the seed spread "
              f"({n_seeds} seed(s)): " + ("met" if all_ahead else "MISSED at " + "; ".join(misses)))
    verdicts.append(second)
    lines += ["", f"Summary: {second}.", ""]
    if n_seeds < 2:
        lines += ["With one seed there is no spread: every margin counts, however small.", ""]


def _latency_budget_lines(groups: dict) -> list[str]:
    """Facts of the ``--budget latency`` runs: the latency share the table predicted and the one
    measured, and the FLOPs share and accuracy they reached."""
    lines = []
    for (_, target), group in sorted(groups.items(), key=lambda item: -item[0][1]):
        if group.budget != "latency" or not group.runs:
            continue
        measured = ", ".join(f"{_mean(group.latency(s, 'latency_share')):.3f} at {s.replace('_', ' ')}"
                             for s in sorted(group.runs[0].get("latency_share", {})))
        lines.append(f"- {group.label} at {target} of the latency: predicted share "
                     f"{_mean(group.values('budget_reached')):.3f}, measured {measured}; FLOPs share "
                     f"{group.flops:.3f}, {group.accuracy:.2f} ± {group.spread:.2f} % (not compared above: "
                     "not at equal FLOPs)")
    return lines


def _latency_target_check(groups: dict, section: dict, lines: list, verdicts: list) -> None:
    """The latency budget's target: every ``--budget latency`` run's measured share, at the
    setting its latency table was timed at (the training's threads, batch 32), within
    :data:`LATENCY_TOLERANCE` of its target."""
    runs = [(target, run) for (_, target), group in sorted(groups.items(), key=lambda item: -item[0][1])
            if group.budget == "latency" for run in group.runs]
    if not runs:
        return
    setting = f"{section['setup']['threads']}t_b32"
    misses, cells = [], []
    for target, run in runs:
        share = run.get("latency_share", {}).get(setting)
        off = None if share is None else share / target - 1
        cells.append(f"{target} seed {run['seed']}: " + ("not measured" if off is None else f"{share:.3f} ({off:+.1%})"))
        if off is None or abs(off) > LATENCY_TOLERANCE:
            misses.append(cells[-1])
    verdict = (f"latency budget within {LATENCY_TOLERANCE:.0%} of its target as measured at {setting.replace('_', ' ')}: "
               + ("met" if not misses else "MISSED") + f" ({len(runs) - len(misses)} of {len(runs)} runs)")
    lines += ["### Latency budget check", "", f"- {verdict}", f"  - per run: {'; '.join(cells)}", ""]
    verdicts.append(verdict)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _timing_lines(section: dict, groups: dict, lines: list) -> None:
    per_step = [b["seconds_per_step"] for b in section["baselines"] if b.get("seconds_per_step")]
    by_method = defaultdict(list)
    for group in groups.values():
        by_method[group.label] += group.values("seconds")
    lines += ["### Time", "",
              f"Baseline training: {_mean(per_step) or 0:.3f} s per step, {section['setup']['threads']} thread(s). "
              f"Whole section: {_duration(section['seconds'])} ({_duration(section['training_seconds'])} of "
              "baselines and pruning runs, the rest measuring).", "",
              "| method | seconds per run (mean) | pruning s/step | fine-tuning s/step |", "|---|---:|---:|---:|"]
    for label, seconds in sorted(by_method.items()):
        runs = [r for g in groups.values() if g.label == label for r in g.runs]
        pruning = [r["pruning_s_per_step"] for r in runs if r.get("pruning_s_per_step")]
        finetune = [r["finetune_s_per_step"] for r in runs if r.get("finetune_s_per_step")]
        lines.append(f"| {label} | {_mean(seconds) or 0:.0f} | "
                     f"{f'{_mean(pruning):.3f}' if pruning else '-'} | "
                     f"{f'{_mean(finetune):.3f}' if finetune else '-'} |")
    lines.append("")
