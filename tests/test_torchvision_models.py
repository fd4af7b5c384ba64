"""torchvision classifiers of several families: exact conversion, channel removal and loading.

The full sweep over ``torchvision.models.list_models`` is ``scripts/coverage_torchvision.py``
(its table: ``resources/supported_torchvision.md``); here a few small models, at small inputs,
cover the integration :mod:`dagprune.torchvision_layers`: StochasticDepth (EfficientNet), Swin's
shifted-window attention and patch merging (a tiny Swin), and plain CNN families.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import dagprune  # noqa: E402
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups  # noqa: E402
from gate_states import random_gate_states  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# name -> input side: the smallest side each model runs at (batch 1)
TORCHVISION_MODELS = {
    "resnet18": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,        # StochasticDepth in every MBConv block
    "shufflenet_v2_x0_5": 64,
    "squeezenet1_1": 64,
    "regnet_x_400mf": 64,
}
TINY_SWIN = "tiny_swin"           # built below: swin_t's layers at 32 px, in a second


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == TINY_SWIN:
        swin = torchvision.models.swin_transformer
        return swin.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                    window_size=[2, 2], stochastic_depth_prob=0.2, num_classes=10).eval()
    return torchvision.models.get_model(name, weights=None).eval()


MODEL_SIDES = {**TORCHVISION_MODELS, TINY_SWIN: 32}


@pytest.fixture(scope="module")
def converted(request):
    """name -> (model, dag, input_size), converted once for all the tests of this file."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build_model(name)
            cache[name] = (model, dagprune.build_from_unstructured_module(model), (3, MODEL_SIDES[name],
                                                                                MODEL_SIDES[name]))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(MODEL_SIDES))
def test_converts_exactly_and_removes_channels_exactly(converted, name):
    model, dag, input_size = converted(name)
    assert dagprune.compare_module_outputs(model, dag, input_shape=(1, *input_size)) <= 1e-5
    assert any(group.prunable for group in find_channel_groups(dag, input_size).groups)

    pruning = ChannelPruning(dag, input_size, 0.9, 10)  # a target every model here can reach
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(1))
    for _ in random_gate_states(pruning, seed=0, count=2):
        slim = pruning.remove_channels().eval()
        with torch.no_grad():
            assert dagprune.max_relative_difference(gated.eval()(x), slim(x)) <= 1e-4


_LOAD_WITHOUT_TORCHVISION = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import dagprune
folder, names, swin = sys.argv[2], sys.argv[3].split(","), sys.argv[4]

def check(name):
    dag = dagprune.load_dag(f"{folder}/{name}").eval()
    expected = torch.load(f"{folder}/{name}.pt")
    with torch.no_grad():
        assert torch.equal(dag(expected["input"]), expected["output"]), name

for name in names:
    check(name)
assert "torchvision" not in sys.modules, "loading a DAG without torchvision layers imported it"
check(swin)  # keeps Swin's attention whole: its support, and torchvision, load on demand
print("LOADED")
"""


def test_saved_dags_load_without_torchvision_imported(converted, tmp_path):
    for name in MODEL_SIDES:
        _, dag, input_size = converted(name)
        dag.eval()
        x = torch.randn(1, *input_size)
        with torch.no_grad():
            torch.save({"input": x, "output": dag(x)}, tmp_path / f"{name}.pt")
        dag.save(tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_TORCHVISION, str(REPO_ROOT), str(tmp_path),
         ",".join(TORCHVISION_MODELS), TINY_SWIN], capture_output=True, text=True, timeout=120)
    assert "LOADED" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_keeps_dropping_in_train_mode(mode):
    layer = torchvision.ops.StochasticDepth(0.5, mode)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), layer)
    dag = dagprune.build_from_unstructured_module(model.eval())
    x = torch.randn(8, 3, 2, 2)
    for training in (True, False):
        model.train(training), dag.train(training)
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert torch.equal(dag(x), expected)  # same draws as torchvision, in either mode


def _tiny_video_models():
    """r3d_18 (its convolutions are torchvision's Conv3DSimple, an nn.Conv3d with a constructor
    of its own) and Swin3D's layers at a small size (fx.wrap-ped window helpers, the attention
    kept whole)."""
    video = torchvision.models.video
    swin3d = video.swin_transformer.SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2, 2],
        stochastic_depth_prob=0.0, num_classes=5)
    return {"r3d_18": (video.r3d_18(weights=None), (1, 3, 4, 32, 32)),
            "swin3d": (swin3d, (1, 3, 4, 32, 32))}


@pytest.mark.parametrize("name", ["r3d_18", "swin3d"])
def test_video_models_convert_save_and_remove_exactly(name, tmp_path):
    torch.manual_seed(0)
    model, shape = _tiny_video_models()[name]
    model, x = model.eval(), torch.randn(*shape)
    dag = dagprune.build_from_unstructured_module(model)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(x), dag(x)) <= 1e-6
    dag.save(tmp_path / "dag")
    with torch.no_grad():
        assert torch.equal(dagprune.load_dag(tmp_path / "dag")(x), dag(x))
    pruning = ChannelPruning(dag, shape[1:], 0.8, 10)
    gated = pruning.prepare_for_pruning().eval()
    assert pruning.prunable_groups
    for _ in random_gate_states(pruning, seed=0, count=1):
        slim = pruning.remove_channels().eval()
        with torch.no_grad():
            assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4
