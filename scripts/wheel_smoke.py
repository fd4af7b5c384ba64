"""Smoke test of an installed dagprune wheel: the library alone converts, prunes and removes.

Run it with the interpreter of a virtual environment that holds the wheel and its core
requirements only (no app extra: no timm, scikit-learn, matplotlib), from a directory outside
the repository, so that the checkout cannot be imported instead of the wheel::

    cd /tmp && /path/to/wheel-venv/bin/python /path/to/repo/scripts/wheel_smoke.py

It converts a two-convolution model, checks the conversion, trains the gates for one step,
closes half of the first convolution's channels, removes them, checks that the slim model
computes what the gated model computes in eval mode, and saves and loads the slim model.
Exit code 0 means the wheel works; a failure raises.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import dagprune as dp
import dagprune_algorithms as dpa

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 16, 16)
REMOVAL_TOLERANCE = 1e-4
"""Largest difference between the slim and the gated model, relative to the output scale."""

APP_PACKAGES = ("timm", "sklearn", "matplotlib", "fvcore")
"""Packages of the ``app`` and ``dev`` extras, which a library-only install must not need."""


def check_installed_from_the_wheel() -> None:
    """Fails if dagprune is imported from the checkout or the app's packages are installed."""
    for module in (dp, dpa):
        location = Path(module.__file__).resolve()
        if REPO_ROOT in location.parents:
            raise SystemExit(f"{module.__name__} was imported from the checkout ({location}), not the "
                             "wheel; run this script from a directory outside the repository")
    present = [name for name in APP_PACKAGES if importlib.util.find_spec(name) is not None]
    if present:
        raise SystemExit(f"{', '.join(present)} installed: this smoke test needs a library-only environment")


def gated_one_step(cfg: dpa.pruning.ChannelPruning, example: torch.Tensor) -> nn.Module:
    """Prepares ``cfg``, trains weights and gates for one step, then closes half of the first group."""
    gated = cfg.prepare_for_pruning().train()
    optimizer = torch.optim.Adam([{"params": cfg.weight_parameters(), "lr": 1e-3},
                                  {"params": cfg.gate_parameters(), "lr": 5e-2}])
    task_loss = gated(example).square().mean()
    _, flops_loss, entropy_loss, bkd_loss = cfg.compute_current_proportion_and_pruning_losses(global_step=0)
    (task_loss + flops_loss + entropy_loss + bkd_loss).backward()
    optimizer.step()
    with torch.no_grad():
        first_logits = cfg.gate_parameters()[0]
        first_logits[::2] = -abs(first_logits[::2]) - 1.0
    return gated.eval()


def main() -> int:
    """Runs the smoke test; returns the exit code."""
    check_installed_from_the_wheel()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    dag = dp.build_from_unstructured_module(model)
    dp.compare_module_outputs(model, dag, (2, *INPUT_SHAPE))

    example = torch.randn(2, *INPUT_SHAPE)
    cfg = dpa.pruning.ChannelPruning(model=dag, input_shape_without_batch=INPUT_SHAPE, pruning_proportion=0.5,
                                     num_training_steps=1)
    gated = gated_one_step(cfg, example)
    slim = cfg.remove_channels().eval()
    with torch.no_grad():
        difference = dp.max_relative_difference(gated(example), slim(example))
    if not difference <= REMOVAL_TOLERANCE:
        raise SystemExit(f"the slim model differs from the gated model by {difference:.3g} > {REMOVAL_TOLERANCE}")
    kept = slim.vertex("_0").module.out_channels
    if kept >= 8:
        raise SystemExit(f"no channel was removed from the first convolution (it keeps {kept} of 8)")

    with tempfile.TemporaryDirectory(prefix="dagprune-wheel-smoke-") as directory:
        loaded = dp.load_dag(slim.save(Path(directory) / "slim")).eval()
        with torch.no_grad():
            round_trip_exact = torch.equal(loaded(example), slim(example))
    if not round_trip_exact:
        raise SystemExit("the slim model's save/load round trip is not bit-exact")
    print(f"wheel smoke: dagprune {dp.__version__} from {Path(dp.__file__).parent}; the first convolution "
          f"keeps {kept} of 8 channels; slim vs gated max relative difference {difference:.1e}; "
          "save/load bit-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
