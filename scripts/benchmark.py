"""Benchmarks of dagprune side by side with torch-dag and Torch-Pruning, in one command.

Sections (``--sections``, default all): ``prepare`` (time to a pruning-ready model),
``overhead`` (gated training step over the plain one, gate parameters), ``latency`` (pruned
models at 0.7 / 0.5 / 0.3 of the FLOPs, torch and onnxruntime), ``accuracy`` (accuracy against
FLOPs: dagprune's two methods and Torch-Pruning's magnitude pruner, several seeds) and
``exactness`` (removal of 10% of every group against the masked model). The peers are
installed by ``scripts/peers/environments.py`` into ``build/peers/`` on first use.

Each section's results go to ``<work-dir>/<section>.json``; the report (markdown with PNG plots)
is rebuilt from every section present there, so sections can be re-run one at a time::

    python scripts/benchmark.py                                   # everything (about an hour on 2 cores)
    python scripts/benchmark.py --sections accuracy --seeds 0 1 2 --data-dir ../shared/data/mnist
    python scripts/benchmark.py --short --out build/benchmarks-short/benchmarks.md   # minutes; no peers
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import accuracy, exactness, latency, overhead, prepare
from benchmarks.common import MODELS, write_json
from benchmarks.report import write_report

SECTIONS = {"prepare": prepare, "overhead": overhead, "latency": latency, "accuracy": accuracy,
            "exactness": exactness}
REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT = dict(models=["resnet18"], repeats=2, peers=[], latency_models=["resnet18"], latency_image_size=64,
             latency_threads=[1], latency_batch_sizes=[1, 32], targets=[0.5], seeds=[0],
             acc_baseline_steps=10, acc_steps=6, acc_finetune_steps=2, overhead_image_size=32,
             overhead_batch_size=8)


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
    parser.add_argument("--latency-block-size", type=int, default=8,
                        help="kept channel counts are multiples of this (ChannelPruning's block_size)")
    parser.add_argument("--latency-threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--latency-batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None, help="accuracy data: image folder or MNIST IDX folder "
                                                         "(default: scikit-learn's digits)")
    parser.add_argument("--acc-model", default="test_resnet")
    parser.add_argument("--acc-image-size", type=int, default=32)
    parser.add_argument("--acc-baseline-steps", type=int, default=200)
    parser.add_argument("--acc-steps", type=int, default=200)
    parser.add_argument("--acc-finetune-steps", type=int, default=100)
    parser.add_argument("--acc-batch-size", type=int, default=64)
    parser.add_argument("--acc-lr", type=float, default=2e-3)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="section results (default: build/benchmarks, or build/benchmarks-short)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "resources" / "benchmarks.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --work-dir")
    args = parser.parse_args(argv)
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
