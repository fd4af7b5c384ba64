"""Benchmarks of dagprune side by side with torch-dag and Torch-Pruning, in one command.

Sections (``--sections``, default all): ``prepare`` (time to a pruning-ready model),
``overhead`` (gated training step over the plain one, gate parameters), ``latency`` (pruned
models at 0.7 / 0.5 / 0.3 of the FLOPs, torch and onnxruntime), ``accuracy`` (accuracy against
FLOPs and measured latency, dagprune's methods and Torch-Pruning's, several seeds) and
``exactness`` (removal of 10% of every group against the masked model). The peers are
installed by ``scripts/peers/environments.py`` into ``build/peers/`` on first use.

The accuracy section (see ``benchmarks/accuracy.py``) trains resnet18 on Fashion-MNIST (from
``../shared/data/fashion-mnist``) to a plateau per seed, then prunes it with dagprune's methods
(differentiable with and without distillation, L1 iterative, latency budget) and Torch-Pruning's
iterative pruners (magnitude, group norm, Taylor) to each FLOPs target with the same step budget.

Each section's results go to ``<work-dir>/<section>.json``; the report (markdown with PNG plots)
is rebuilt from every section present there, so sections can be re-run one at a time::

    python scripts/benchmark.py --sections prepare overhead latency exactness   # about an hour on 2 cores
    python scripts/benchmark.py --sections accuracy               # hours: see benchmarks/accuracy.py
    python scripts/benchmark.py --short --out build/benchmarks-short/benchmarks.md   # minutes; no peers
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import accuracy as accuracy_section
from benchmarks import exactness, latency, overhead, prepare
from benchmarks.common import MODELS, write_json
from benchmarks.report import write_report

SECTIONS = {"prepare": prepare, "overhead": overhead, "latency": latency, "accuracy": accuracy_section,
            "exactness": exactness}
REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = REPO_ROOT.parent / "shared" / "data" / "fashion-mnist"
"""The accuracy section's data set unless ``--data-dir`` names another (see its README)."""
SHORT = dict(models=["resnet18"], repeats=2, peers=[], latency_models=["resnet18"], latency_image_size=64,
             latency_threads=[1], latency_batch_sizes=[1, 32], targets=[0.5], seeds=[0],
             acc_model="test_resnet", acc_methods=["dag_distill", "dag", "l1"], acc_steps=6,
             acc_finetune_steps=2, acc_baseline_max_steps=10, acc_baseline_decay_max_steps=4,
             acc_baseline_eval_every=5, acc_baseline_patience=2, acc_baseline_selection=200,
             acc_latency_repeats=2, overhead_image_size=32, overhead_batch_size=8)


def _round_to(text: str) -> int | str:
    return text if text == "auto" else int(text)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--short", action="store_true",
                        help="a few minutes: resnet18 only, tiny budgets, no peers (what CI runs)")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", nargs="*", default=["torch-dag", "torch-pruning"],
                        choices=["torch-dag", "torch-pruning"], help="tools to compare with (none: --peers)")
    parser.add_argument("--peer-timeout", type=float, default=3600, help="seconds per peer section")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--overhead-image-size", type=int, default=64)
    parser.add_argument("--overhead-batch-size", type=int, default=32)
    parser.add_argument("--latency-models", nargs="+",
                        default=["resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0",
                                 "convnext_tiny", "deit_tiny_patch16_224"])
    parser.add_argument("--latency-image-size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--latency-round-to", nargs="+", type=_round_to, default=[1, "auto"],
                        help="width rules compared side by side (ChannelPruning's round_to): 1 keeps any "
                             "channel count, auto the multiple of this machine's width table, N multiples of N")
    parser.add_argument("--latency-threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--latency-batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None,
                        help="accuracy data: MNIST-style IDX folder or image folder, or 'digits' for "
                             f"scikit-learn's digits (default: {FASHION_MNIST}; with --short: digits)")
    _add_accuracy_arguments(parser)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="section results (default: build/benchmarks, or build/benchmarks-short)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "resources" / "benchmarks.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --work-dir")
    args = parser.parse_args(argv)
    _default_data_dir(parser, args, argv)
    if args.short:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for key, value in SHORT.items():
            if key not in given:
                setattr(args, key, value)
        if "out" not in given:
            args.out = REPO_ROOT / "build" / "benchmarks-short" / "benchmarks.md"
    if args.work_dir is None:
        args.work_dir = REPO_ROOT / "build" / ("benchmarks-short" if args.short else "benchmarks")
    return args


def _add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    accuracy = parser.add_argument_group("accuracy section", "budgets of benchmarks/accuracy.py")
    accuracy.add_argument("--acc-model", default="resnet18", help="timm model (pretrained=False)")
    accuracy.add_argument("--acc-image-size", type=int, default=32)
    accuracy.add_argument("--acc-methods", nargs="+", choices=list(accuracy_section.METHODS),
                          default=list(accuracy_section.METHODS))
    accuracy.add_argument("--acc-steps", type=int, default=300,
                          help="pruning-phase steps of every method (at --acc-lr)")
    accuracy.add_argument("--acc-finetune-steps", type=int, default=200,
                          help="fine-tuning steps of every method (at --acc-lr / 10)")
    accuracy.add_argument("--acc-batch-size", type=int, default=64)
    accuracy.add_argument("--acc-lr", type=float, default=2e-3)
    accuracy.add_argument("--acc-limit-val", type=int, default=None,
                          help="validation images the methods are evaluated on (default: all)")
    accuracy.add_argument("--acc-baseline-max-steps", type=int, default=6000,
                          help="step cap of the baseline's first phase (at --acc-lr)")
    accuracy.add_argument("--acc-baseline-decay-max-steps", type=int, default=2400,
                          help="step cap of the baseline's second phase at --acc-lr / 10 (0: none)")
    accuracy.add_argument("--acc-baseline-eval-every", type=int, default=400,
                          help="steps between the baseline's evaluations on its selection split")
    accuracy.add_argument("--acc-baseline-patience", type=int, default=3,
                          help="evaluations without improvement that end a baseline phase")
    accuracy.add_argument("--acc-baseline-min-delta", type=float, default=0.2,
                          help="points of selection accuracy that count as an improvement")
    accuracy.add_argument("--acc-baseline-selection", type=int, default=5000,
                          help="training images held out to decide when the baseline has converged")
    accuracy.add_argument("--acc-latency-repeats", type=int, default=40,
                          help="timed rounds per latency setting of the pruned models")


def _default_data_dir(parser, args, argv) -> None:
    """``--data-dir``: 'digits' means scikit-learn's digits; unset, Fashion-MNIST (digits with
    --short)."""
    if args.data_dir == "digits" or (args.data_dir is None and args.short):
        args.data_dir = None
    elif args.data_dir is None:
        if "accuracy" in args.sections and not FASHION_MNIST.is_dir():
            parser.error(f"the accuracy section reads Fashion-MNIST from {FASHION_MNIST}, which does not "
                         "exist; pass --data-dir (an IDX or image folder, or 'digits')")
        args.data_dir = str(FASHION_MNIST)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    command = "python scripts/benchmark.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.sections:
            print(f"benchmark: {name} ...", file=sys.stderr, flush=True)
            result = SECTIONS[name].run(args)
            result["command"] = command
            write_json(args.work_dir / f"{name}.json", result)
    results = {name: json.loads((args.work_dir / f"{name}.json").read_text())
               for name in SECTIONS if (args.work_dir / f"{name}.json").exists()}
    commands = sorted({r.pop("command", command) for r in results.values()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, args.out, "`; `".join(commands))
    print(f"benchmark: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
