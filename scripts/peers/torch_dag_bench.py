"""torch-dag's side of the benchmark: preparation time and exactness of channel removal.

Runs only in torch-dag's own environment (see ``environments.py``)::

    build/peers/torch-dag/bin/python scripts/peers/torch_dag_bench.py --section prepare \\
        --models resnet18 deit_tiny_patch16_224 --repeats 5 --out prepare.json

Sections:

``prepare``
    One thread; per model the median seconds of ``td.build_from_unstructured_module`` (convert)
    and of ``ChannelPruning(...)`` plus ``prepare_for_pruning()`` (prepare), the number of
    orbits (torch-dag's channel groups) and the parameters its orbit modules add.
``exactness``
    In every orbit 10% of the channels (at least one, seeded) are closed and the rest opened;
    the output of the gated model in eval mode, with each mask replaced by the hard 0/1 mask
    that channel removal reads, is compared with the output after ``remove_channels()``.
    A model is exact when the two outputs agree (relative difference <= 1e-4) and closing the
    channels did change the output (``masks_took_effect``): a no-op removal cannot pass.

Every model is measured on its own: a failure is recorded as ``"stage: Type: message"`` in its
row and the next model runs. The JSON file is rewritten (atomically) after every model.
"""

from __future__ import annotations

import os
import warnings

# torch-dag unpickles whole modules, which torch >= 2.6 refuses under its weights-only default.
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
# torch-dag warns on import (torch.jit deprecations) and in every forward pass (torch.tensor of a
# tensor); the benchmark shows the last lines of stderr when this script fails, so they go.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
warnings.filterwarnings("ignore", module=r"torch_dag")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch_dag as td  # noqa: E402
import torch_dag_algorithms as tda  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the shared helpers
from benchmarks.common import (StageError, record_removal_exactness, stage,  # noqa: E402
                               unit_layer_scales, write_json)

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0",
          "convnext_tiny", "regnety_004", "densenet121", "deit_tiny_patch16_224",
          "vit_small_patch16_224", "fbnetv3_g", "repvit_m1"]
"""The twelve models of the comparison (timm names, ``pretrained=False``)."""

PRUNING_PROPORTION = 0.5
NUM_TRAINING_STEPS = 10000
"""Arguments of ``ChannelPruning`` from torch-dag's pruning readme; they do not change what
``prepare_for_pruning`` builds."""

CLOSED_FRACTION = 0.1
"""Share of each orbit's channels closed in the exactness section."""

CLOSED_LOGIT = -100.0
OPEN_LOGIT = 100.0
"""Orbit logits written for closed and open channels. torch-dag keeps a channel when its logit
is > 0; at +-100 its Gumbel-softmax sample is also exactly 1 or 0 in float32."""

def create_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The timm model in eval mode (seed 0) and its default input shape without batch."""
    with stage("model"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        return model, tuple(model.pretrained_cfg["input_size"])


def build_pruning_config(dag, input_shape: tuple[int, ...]) -> tda.pruning.ChannelPruning:
    return tda.pruning.ChannelPruning(model=dag, input_shape_without_batch=input_shape,
                                      pruning_proportion=PRUNING_PROPORTION,
                                      num_training_steps=NUM_TRAINING_STEPS)


def orbits_of(pruning_model) -> list:
    """torch-dag's ``OrbitModule`` s of a prepared model, in creation order (``orbit_<k>``)."""
    orbits = tda.pruning.get_orbits_dict(pruning_model)
    return [orbits[name] for name in sorted(orbits, key=lambda name: (len(name), name))]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _as_float(value):
    return None if value is None else float(value)


def measure_prepare(name: str, repeats: int) -> dict:
    """Convert and prepare times of one model; see the module docstring."""
    row = {"model": name, "input_size": None, "error": None}
    try:
        model, input_shape = create_model(name)
        row["input_size"] = list(input_shape)
        conversions, preparations = [], []
        for _ in range(repeats):
            with stage("conversion"):
                started = time.perf_counter()
                dag = td.build_from_unstructured_module(model)
                conversions.append(time.perf_counter() - started)
            with stage("prepare"):
                started = time.perf_counter()
                pruning_config = build_pruning_config(dag, input_shape)
                pruning_model = pruning_config.prepare_for_pruning()
                preparations.append(time.perf_counter() - started)
        with stage("groups"):
            orbits = orbits_of(pruning_model)
            row.update(
                groups=len(orbits),
                gate_parameters=parameter_count(pruning_model) - parameter_count(dag),
                gate_parameters_c2_plus_11c=sum(orbit.num_channels ** 2 + 11 * orbit.num_channels
                                                for orbit in orbits),
                prunable_proportion=_as_float(getattr(pruning_config, "prunable_proportion", None)))
    except StageError as error:
        row["error"] = str(error)
        return row
    row.update(convert_s=statistics.median(conversions), prepare_s=statistics.median(preparations),
               first_total_s=conversions[0] + preparations[0])
    row["total_s"] = row["convert_s"] + row["prepare_s"]
    return row


def set_orbit_logits(orbits: list, closed_channels: dict[str, np.ndarray]) -> None:
    """Opens every channel of every orbit except ``closed_channels[orbit.name]``.

    ``OrbitModule.debug_logits``, when set, replaces the logits computed from the orbit's own
    convolutions; both the mask sampling and ``compute_output_channel_masks`` read it.
    """
    for orbit in orbits:
        logits = torch.full((orbit.num_channels,), OPEN_LOGIT)
        closed = torch.as_tensor(closed_channels.get(orbit.name, []), dtype=torch.long)
        logits[closed] = CLOSED_LOGIT
        orbit.debug_logits = logits


def draw_closed_channels(orbits: list, seed: int = 0) -> dict[str, np.ndarray]:
    """``CLOSED_FRACTION`` of each orbit's channels (rounded, at least one, never all), seeded."""
    generator = np.random.default_rng(seed)
    closed_channels = {}
    for orbit in orbits:
        count = min(max(1, round(orbit.num_channels * CLOSED_FRACTION)), orbit.num_channels - 1)
        closed_channels[orbit.name] = np.sort(generator.choice(orbit.num_channels, count,
                                                               replace=False))
    return closed_channels


@contextlib.contextmanager
def hard_masks(orbits: list):
    """Makes every ``MaskModule`` apply its orbit's hard 0/1 mask.

    torch-dag's ``MaskModule`` samples its mask in eval mode too (Gumbel-softmax, plus a
    Bernoulli draw that re-opens closed channels with probability mean(sigmoid(logits))). The
    hard mask is the one ``remove_channels`` keeps: ``compute_output_channel_masks``.
    """
    for orbit in orbits:
        mask = orbit.compute_output_channel_masks(predecessors_channel_masks=[])[0]
        orbit.sample = lambda mask=mask.to(torch.float32): mask
    try:
        yield
    finally:
        for orbit in orbits:
            del orbit.sample


def measure_exactness(name: str) -> dict:
    """Gated output vs. output after channel removal for one model; see the module docstring."""
    row = {"model": name, "input_size": None, "groups": None, "closed_channels": None,
           "max_rel_diff": None, "exact": False, "mask_effect_rel_diff": None,
           "masks_took_effect": None, "eval_forward_stochastic": None, "flops_proportion": None,
           "error": None}
    try:
        model, input_shape = create_model(name)
        unit_layer_scales(model)
        row["input_size"] = list(input_shape)
        x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
        with stage("conversion"):
            dag = td.build_from_unstructured_module(model).eval()
        with stage("prepare"):
            pruning_config = build_pruning_config(dag, input_shape)
            pruning_model = pruning_config.prepare_for_pruning().eval()
            orbits = orbits_of(pruning_model)
        row["groups"] = len(orbits)
        with stage("gated_forward"), torch.no_grad():
            set_orbit_logits(orbits, {})
            with hard_masks(orbits):
                open_output = pruning_model(x)
            closed_channels = draw_closed_channels(orbits)
            row["closed_channels"] = int(sum(len(c) for c in closed_channels.values()))
            set_orbit_logits(orbits, closed_channels)
            with hard_masks(orbits):
                gated_output = pruning_model(x)
            row["eval_forward_stochastic"] = not torch.equal(pruning_model(x), pruning_model(x))
        with stage("removal"):
            removed_model = pruning_config.remove_channels().eval()
        with stage("removed_forward"), torch.no_grad():
            removed_output = removed_model(x)
        with stage("comparison"):
            record_removal_exactness(row, open_output, gated_output, removed_output)
        # prepare_for_pruning works on a deep copy, so ``dag`` still is the unpruned model
        with stage("flops"):
            row["flops_proportion"] = float(
                tda.pruning.compute_normalized_flops(removed_model, input_shape)
                / tda.pruning.compute_normalized_flops(dag, input_shape))
    except StageError as error:
        row["error"] = str(error)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", required=True, choices=["prepare", "exactness"])
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="MODEL")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (prepare)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    report = {"tool": "torch-dag", "version": version("torch-dag"), "timm": timm.__version__,
              "torch": torch.__version__, "section": args.section,
              "threads": torch.get_num_threads(), "results": []}
    if args.section == "prepare":
        measure = functools.partial(measure_prepare, repeats=args.repeats)
    else:
        measure = measure_exactness
    for name in args.models:
        try:
            row = measure(name)
        except Exception as error:  # any model's failure is a row, never the end of the run
            row = {"model": name, "error": f"unexpected: {type(error).__name__}: {error}"[:400]}
        report["results"].append(row)
        write_json(args.out, report)
        print(json.dumps(row), file=sys.stderr, flush=True)
        gc.collect()
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
