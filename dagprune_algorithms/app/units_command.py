"""``dagprune units``: print a model's channel units as a config or choice template (JSON).

The counterpart of mmrazor's ``tools/get_channel_units.py`` (same flags): ``MODEL`` is a timm
model name (built with ``pretrained=False``) or a directory holding a saved DAG.

    dagprune units resnet34                 # config template: unit type, default args, units
    dagprune units resnet34 -i              # ... with each unit's init_args
    dagprune units resnet34 -c -o units.json  # ... with channel lists: parse_cfg type "Config"
    dagprune units resnet34 --choice        # {unit name: choice}: a target_pruning_ratio template
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dagprune.errors import DagpruneError

__all__ = ["add_units_arguments", "run_units", "format_json", "UnitsUsageError"]


class UnitsUsageError(DagpruneError):
    """An argument of ``dagprune units`` cannot be honoured."""


def add_units_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the arguments of ``dagprune units`` (and ``scripts/get_channel_units.py``)."""
    from dagprune_algorithms.pruning.channel_groups import HEAD_PRUNING_MODES
    from dagprune_algorithms.pruning.units import CHANNEL_UNIT_TYPES, CHOICE_MODES

    parser.add_argument("model", metavar="MODEL",
                        help="a timm model name (pretrained=False) or a directory holding a saved DAG")
    parser.add_argument("-c", "--with-channels", "--with-channel", dest="with_channels",
                        action="store_true",
                        help="add each unit's channel lists (the template then rebuilds the units "
                             "without analysing the model: parse_cfg type 'Config')")
    parser.add_argument("-i", "--with-init-args", action="store_true",
                        help="add each unit's init_args")
    parser.add_argument("--choice", action="store_true",
                        help="print the choice template {unit name: choice} of the mutable units "
                             "instead (-c and -i are then ignored)")
    parser.add_argument("--only-mutable", action="store_true",
                        help="leave out the units that cannot be pruned")
    parser.add_argument("-o", "--output-path", metavar="PATH",
                        help="also write the JSON to PATH")
    parser.add_argument("--input-size", type=int, nargs="+", default=[3, 224, 224], metavar="DIM",
                        help="input shape without batch for the analysis (default: 3 224 224)")
    parser.add_argument("--unit-type", default="L1ChannelUnit", choices=sorted(CHANNEL_UNIT_TYPES),
                        help="unit type written into the template (default: L1ChannelUnit)")
    parser.add_argument("--choice-mode", default="ratio", choices=CHOICE_MODES,
                        help="choices as the fraction of channels kept (ratio) or their number")
    parser.add_argument("--head-pruning", choices=HEAD_PRUNING_MODES, default="dims",
                        help="attention units hold head dims (dims, default) or whole heads (heads)")
    parser.add_argument("--exclude", action="extend", nargs="+", default=None, metavar="MODULE",
                        help="module paths (head.fc) or fnmatch patterns (stem*) to leave alone: the "
                             "units whose channels flow into or out of them are not mutable")


def run_units(args: argparse.Namespace) -> int:
    """Prints the template for ``args`` (see :func:`add_units_arguments`); returns the exit code.

    Raises:
        UnitsUsageError: MODEL is neither a saved DAG nor a timm model, or the input size is unusable.
        PruningError: the channel analysis fails.
    """
    from dagprune_algorithms.pruning.mutator import ChannelMutator

    input_size = tuple(args.input_size)
    if any(dim <= 0 for dim in input_size):
        raise UnitsUsageError(f"--input-size must be positive, got {' '.join(map(str, input_size))}")
    if args.output_path:
        _check_output_path(Path(args.output_path))
    dag = _load_dag(args.model, input_size)
    mutator = ChannelMutator({"type": args.unit_type, "default_args": {"choice_mode": args.choice_mode}},
                             {"type": "ChannelAnalysis", "input_shape": list(input_size),
                              "head_pruning": args.head_pruning, "exclude": args.exclude or []})
    try:
        mutator.prepare_from_supernet(dag)
    except (RuntimeError, ValueError, IndexError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UnitsUsageError(f"{args.model} cannot be analysed on an input of shape "
                              f"{'x'.join(map(str, input_size))}: {type(error).__name__}: {first_line}; "
                              "choose another --input-size") from error
    if args.choice:
        template = mutator.choice_template()
    else:
        template = mutator.config_template(only_mutable_units=args.only_mutable,
                                           with_unit_init_args=args.with_init_args,
                                           with_channels=args.with_channels)
    text = format_json(template)
    print(text)
    if args.output_path:
        path = Path(args.output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"saved: {path}", file=sys.stderr)
    return 0


def format_json(value, indent: int = 4, level: int = 0) -> str:
    """JSON indented like ``json.dumps(value, indent=4)``, with lists of numbers on one line
    (channel runs, input shapes).

    >>> print(format_json({"input_shape": [3, 224, 224], "runs": [[0, 64, 0, 1]]}))
    {
        "input_shape": [3, 224, 224],
        "runs": [
            [0, 64, 0, 1]
        ]
    }
    """
    inner, outer = " " * (indent * (level + 1)), " " * (indent * level)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(key))}: {format_json(item, indent, level + 1)}"
                 for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = [f"{inner}{format_json(item, indent, level + 1)}" for item in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value)


def _check_output_path(path: Path) -> None:
    """Raises :class:`UnitsUsageError` when ``-o PATH`` is a directory or lies below a file."""
    if path.is_dir():
        raise UnitsUsageError(f"-o {path} is a directory; give a file path such as {path / 'units.json'}")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UnitsUsageError(f"-o {path} is below {blocking}, a file; choose a path in a directory")


def _load_dag(model: str, input_size: tuple[int, ...]):
    import dagprune
    from dagprune_algorithms.app.models import UnknownModelError, as_dag, create_timm_model

    if os.path.exists(model):
        return dagprune.load_dag(model).eval()
    try:
        created = create_timm_model(model, input_size)
    except UnknownModelError as error:
        hint = f"; closest timm names: {', '.join(error.close_matches)}" if error.close_matches else ""
        raise UnitsUsageError(f"{model!r} is neither a saved DAG directory nor a timm model name{hint}") from error
    return as_dag(created.eval(), input_size, name=model)
