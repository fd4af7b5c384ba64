"""``resources/benchmarks.md`` and its plots, from the sections' JSON results."""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from pathlib import Path

import torch

from .accuracy_report import accuracy_section
from .plots import figure as _figure

PEER_ORDER = ["dagprune", "torch-dag", "torch-pruning"]
TOOL_NAMES = {"dagprune": "dagprune", "torch-dag": "torch-dag", "torch-pruning": "Torch-Pruning"}
PREPARE_SPEEDUP_TARGET = 3.0
OVERHEAD_TARGET = 1.05  # issue 18: gated step <= 1.05x the plain step
LATENCY_EFFICIENCY_TARGETS = {32: 0.9, 1: 0.75}  # issue 18: by batch size


def _seconds(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return f"fails ({row['error'][:60]})"
    return f"{row['total_s']:.3f}"


def _by_model(section: dict, tool: str) -> dict:
    return {row["model"]: row for row in section.get(tool, {}).get("results", [])}


def _versions(section: dict) -> str:
    parts = []
    for tool in PEER_ORDER[1:]:
        data = section.get(tool)
        if data and data.get("version"):
            parts.append(f"{TOOL_NAMES[tool]} {data['version']} (timm {data.get('timm', '?')})")
        elif data and data.get("error"):
            parts.append(f"{TOOL_NAMES[tool]}: not run ({data['error'][:120]})")
    return "; ".join(parts)


def prepare_section(section: dict, plots: Path, lines: list, verdicts: list) -> None:
    ours, dag, tp = (_by_model(section, tool) for tool in PEER_ORDER)
    lines += ["## 1. Time to a pruning-ready model", "",
              "One torch thread, median of the runs, timm's default input size. dagprune and torch-dag: "
              "conversion + group search + gates (dagprune's include the FLOPs tables and L1-ranked gates); "
              "Torch-Pruning: its DependencyGraph and pruning groups, and (last columns) what a user "
              "runs before a FLOPs-targeted prune: a MagnitudePruner and a FLOPs count.",
              f"Peers: {_versions(section) or 'not run'}.", "",
              "| model | dagprune s | torch-dag s | Torch-Pruning s | torch-dag / dagprune | "
              "Torch-Pruning / dagprune | prunable groups | prunable_proportion | "
              "Torch-Pruning pruner + FLOPs s | that / dagprune |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    speedups, at_or_under = [], {"total_s": [], "pruner_flops_s": []}
    for name, row in ours.items():
        ratio = lambda peer, key="total_s": (
            f"{peer[name][key] / row['total_s']:.1f}x" if name in peer and not peer[name].get("error")
            and not row.get("error") and peer[name].get(key) else "-")
        if name in dag and not dag[name].get("error") and not row.get("error"):
            speedups.append((name, dag[name]["total_s"] / row["total_s"]))
        for key, names in at_or_under.items():
            peer = tp.get(name) or {}
            if not peer.get("error") and not row.get("error") and peer.get(key) and row["total_s"] <= peer[key]:
                names.append(name)
        pruner = tp.get(name, {}).get("pruner_flops_s")
        lines.append(f"| {name} | {_seconds(row)} | {_seconds(dag.get(name))} | {_seconds(tp.get(name))} | "
                     f"{ratio(dag)} | {ratio(tp)} | {row.get('groups', '-')} | "
                     f"{row.get('prunable_proportion', float('nan')):.4f} | "
                     f"{f'{pruner:.3f}' if pruner else '-'} | {ratio(tp, 'pruner_flops_s')} |")
    lines.append("")
    if any(tp.values()):
        verdicts.append(f"Time to pruning-ready at or under Torch-Pruning's (graph and groups): on "
                        f"{len(at_or_under['total_s'])} of {len(ours)}; under its pruner + FLOPs count: on "
                        f"{len(at_or_under['pruner_flops_s'])} of {len(ours)}")
    if speedups:
        slowest = min(speedups, key=lambda item: item[1])
        failed_peer = [n for n in ours if n in dag and dag[n].get("error")]
        verdicts.append(f"Time to pruning-ready >= {PREPARE_SPEEDUP_TARGET:.0f}x faster than torch-dag: "
                        f"{'met' if slowest[1] >= PREPARE_SPEEDUP_TARGET else 'MISSED'} (smallest ratio "
                        f"{slowest[1]:.1f}x on {slowest[0]}" + (f"; torch-dag fails on {', '.join(failed_peer)}"
                                                                 if failed_peer else "") + ")")
        _bar_plot(ours, dag, tp, plots / "benchmark_prepare_time.png")
        lines += [f"![time to pruning-ready]({plots.name}/benchmark_prepare_time.png)", ""]


def _bar_plot(ours, dag, tp, path: Path) -> None:
    names = list(ours)
    with _figure(path, (10, 4), "", "seconds to a pruning-ready model (1 thread)") as axis:
        for offset, (label, rows) in enumerate([("dagprune", ours), ("torch-dag", dag), ("Torch-Pruning", tp)]):
            values = [rows[n]["total_s"] if n in rows and not rows[n].get("error") else 0 for n in names]
            axis.bar([i + (offset - 1) * 0.27 for i in range(len(names))], values, 0.27, label=label)
        axis.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        axis.set_yscale("log")


def overhead_section(section: dict, prepare: dict | None, lines: list, verdicts: list) -> None:
    peer_gates = _by_model(prepare or {}, "torch-dag")
    rows = section["dagprune"]["results"]
    first = next((r for r in rows if not r.get("error")), {})
    lines += ["## 2. Training overhead", "",
              f"Step = forward + backward + Adam (+ the three pruning losses for the gated model), batch "
              f"{first.get('batch_size', '?')} at {'x'.join(map(str, first.get('input_size', [])))}, "
              f"{section['dagprune'].get('threads', '?')} torch threads, the two models stepping in "
              "alternation; median step times and, per round, the ratio of the two steps (median "
              "[quartiles]; the target is judged on it). Eval forward: both models in eval mode "
              "without gradients (the gated model with its hard masks), timed the same way.", "",
              "| model | plain ms | gated ms | gated / plain | per round: gated / plain "
              "| eval forward: gated / plain | gate parameters | torch-dag gate parameters |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['model']} | fails ({row['error'][:80]}) | | | | | | |")
            continue
        ratios.append((row["model"], row.get("pair_ratio", row["ratio"])))
        peer = peer_gates.get(row["model"], {})
        eval_ratio = f"{row.get('eval_pair_ratio', row['eval_ratio']):.2f}x" if "eval_ratio" in row else "-"
        peer_gates_count = peer.get('gate_parameters', '-') if not peer.get('error') else '-'
        lines.append(f"| {row['model']} | {row['plain_ms']:.1f} | {row['gated_ms']:.1f} | {row['ratio']:.2f}x | "
                     f"{_paired(row)} | {eval_ratio} | {row['gate_parameters']:,} | {peer_gates_count} |")
    lines.append("")
    if ratios:
        over = [f"{name} {ratio:.2f}x" for name, ratio in ratios if ratio > OVERHEAD_TARGET]
        verdicts.append(f"Gated step <= {OVERHEAD_TARGET}x the plain step: "
                        + ("met on every model" if not over else f"MISSED on {len(over)} of {len(ratios)}: "
                           + ", ".join(over)))
        if over:
            lines += ["Where the target is missed: the gated step adds, per mask site, a few small ops "
                      "(a masked layer norm is several full-size ops instead of one fused kernel, "
                      "even with its gradient written out; attention-head masks multiply activations; "
                      "each gate samples its mask), and "
                      "their fixed per-op cost weighs most when each op is small (ViTs and ConvNeXts "
                      "at small inputs); at large inputs the masked layer norm's extra full-size passes "
                      "weigh most (ViTs). Conv (grouped and depthwise too) and linear consumers mask "
                      "the smaller of weight and input, and the loss terms of all gates are computed "
                      "together.", ""]


def _paired(row: dict) -> str:
    """The per-round ratio with its quartiles (rows from before it was recorded: "-")."""
    if "pair_ratio" not in row:
        return "-"
    low, high = row["pair_ratio_quartiles"]
    return f"{row['pair_ratio']:.2f}x [{low:.2f}-{high:.2f}]"


def latency_section(section: dict, plots: Path, lines: list, verdicts: list) -> None:
    rows = section["dagprune"]["results"]
    lines += ["## 3. Latency of pruned models", "",
              "Pruned without training to each FLOPs target (L1 importance, calibrated), once per width "
              "rule: round_to 1 keeps any channel count, auto rounds kept counts up to the multiple of this "
              "machine's width table (" + section["dagprune"].get("width_table", "-") + "). Original and "
              "slim models timed in alternation, median; speed-up: median of the per-round ratios "
              "original / pruned (quartiles in brackets; rows from before they were recorded: the ratio "
              "of the medians). Efficiency = speed-up / FLOPs reduction; "
              f"targets: >= {LATENCY_EFFICIENCY_TARGETS[32]} at batch 32 and >= {LATENCY_EFFICIENCY_TARGETS[1]} "
              "at batch 1 (torch).", "",
              "| model | runtime | threads | batch | target | round_to (multiple) | FLOPs share | original ms | "
              "pruned ms | speed-up | FLOPs reduction | efficiency |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    misses, checked = defaultdict(list), defaultdict(int)
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['model']} | {row.get('runtime', '-')} | {row.get('threads', '-')} | "
                         f"{row.get('batch_size', '-')} | fails: {row['error'][:80]} | | | | | | | |")
            continue
        rule = row.get("round_to", 1)
        lines.append(f"| {row['model']} | {row['runtime']} | {row['threads']} | {row['batch_size']} | "
                     f"{row['target']} | {rule} ({row.get('multiple', rule)}) | {row['flops_proportion']:.3f} | "
                     f"{row['original_ms']:.1f} | {row['pruned_ms']:.1f} | {_speedup(row)} | "
                     f"{row['flops_reduction']:.2f}x | {row['efficiency']:.2f} |")
        target = LATENCY_EFFICIENCY_TARGETS.get(1 if row["batch_size"] == 1 else 32)
        if row["runtime"] == "torch" and target is not None:
            checked[rule] += 1
            if row["efficiency"] < target:
                misses[rule].append(f"{row['model']} @{row['target']} {row['threads']}t b{row['batch_size']}: "
                                    f"{row['efficiency']:.2f}")
    lines.append("")
    for rule, count in checked.items():
        verdicts.append(f"Efficiency >= {LATENCY_EFFICIENCY_TARGETS[32]} at batch 32 and >= "
                        f"{LATENCY_EFFICIENCY_TARGETS[1]} at batch 1 (torch, CPU), round_to {rule}: "
                        + (f"met in all {count} cases" if not misses[rule] else
                           f"MISSED in {len(misses[rule])} of {count}: " + "; ".join(misses[rule])))
    if checked:
        _latency_plot(rows, plots / "benchmark_latency.png")
        lines += [f"![latency]({plots.name}/benchmark_latency.png)", ""]


def _speedup(row: dict) -> str:
    """``1.80x [1.75-1.86]``: the per-round speed-up and its quartiles (older rows: the bare ratio)."""
    quartiles = row.get("speedup_quartiles")
    return f"{row['speedup']:.2f}x" + (f" [{quartiles[0]:.2f}-{quartiles[1]:.2f}]" if quartiles else "")


def _latency_plot(rows, path: Path) -> None:
    series = defaultdict(list)
    for row in rows:
        if not row.get("error") and row["runtime"] == "torch" and row["batch_size"] >= 32:
            series[(row["model"], row["threads"], row.get("round_to", 1))].append(
                (row["flops_reduction"], row["speedup"]))
    with _figure(path, (6, 4.5), "FLOPs reduction (original / pruned)", "measured speed-up, batch 32",
                 legend_size=7) as axis:
        top = 1.0
        for (model, threads, rule), points in sorted(series.items(), key=str):
            points.sort()
            axis.plot(*zip(*points), marker="o", linestyle="-" if rule == "auto" else ":",
                      label=f"{model} ({threads}t, round_to {rule})")
            top = max(top, max(max(p) for p in points))
        axis.plot([1, top], [1, top], "k--", linewidth=0.8, label="speed-up = FLOPs reduction")
        axis.plot([1, top], [0.9, 0.9 * top], "k:", linewidth=0.8, label="0.9 x FLOPs reduction")


def exactness_section(section: dict, lines: list, verdicts: list) -> None:
    tools = [t for t in PEER_ORDER if t in section]
    by_tool = {tool: _by_model(section, tool) for tool in tools}
    lines += ["## 5. Exactness stress", "",
              "10% of the channels of every prunable group removed (seeded); the slim model's output "
              "against the tool's masked model (relative difference, <= 1e-4 counts as equal; closing "
              "the channels must change the output).", "",
              "| model | " + " | ".join(TOOL_NAMES[t] for t in tools) + " |",
              "|---|" + "---|" * len(tools)]

    def cell(row):
        if row is None:
            return "-"
        if row.get("error"):
            return f"fails: {row['error'][:70]}"
        mark = "equal" if row.get("exact") else "DIFFERS"
        return f"{mark} ({row['max_rel_diff']:.1e})"

    for name in by_tool["dagprune"]:
        lines.append(f"| {name} | " + " | ".join(cell(by_tool[t].get(name)) for t in tools) + " |")
    for tool in tools:
        if section[tool].get("error"):
            lines.append(f"\n{TOOL_NAMES[tool]} not run: {section[tool]['error'][:200]}")
    lines.append("")
    for tool in tools:
        rows = by_tool[tool].values()
        if rows:
            exact = sum(bool(r.get("exact")) for r in rows)
            verdicts.append(f"Exact removal, {TOOL_NAMES[tool]}: {exact} of {len(rows)} models")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(results: dict, out: Path, command: str) -> None:
    """Writes the markdown report (and PNGs next to it, under ``<stem>_plots/``)."""
    plots = out.parent / f"{out.stem}_plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    verdicts: list[str] = []
    if "prepare" in results:
        prepare_section(results["prepare"], plots, lines, verdicts)
    if "overhead" in results:
        overhead_section(results["overhead"], results.get("prepare"), lines, verdicts)
    if "latency" in results:
        latency_section(results["latency"], plots, lines, verdicts)
    if "accuracy" in results:
        accuracy_section(results["accuracy"], plots, lines, verdicts)
    if "exactness" in results:
        exactness_section(results["exactness"], lines, verdicts)
    header = ["# Benchmarks: dagprune, torch-dag and Torch-Pruning", "",
              f"Command: `{command}`  ",
              f"Machine: {_cpu_name()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch threads by default; python {platform.python_version()}, "
              f"torch {torch.__version__}. Each section below was measured in one run of the command "
              "that names it above; "
              "timing figures are side by side in that run, on 2 cores shared with other jobs.", "",
              "## Targets", ""] + [f"- {v}" for v in verdicts] + [""]
    out.write_text("\n".join(header + lines) + "\n")
