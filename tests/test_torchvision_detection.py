"""torchvision beyond classifiers: segmentation models whole, detectors by their backbone.

A detector's forward loops over a list of images in Python, so the part that prunes is its
backbone with the feature pyramid (one batch tensor in, an ordered dict of feature maps out):
it is converted, pruned and put back into the detector, which then detects with it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import dagprune
from dagprune.errors import DagpruneError
from gate_states import random_gate_states
from dagprune_algorithms.pruning import ChannelPruning

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(name: str, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()


def test_segmentation_model_converts_for_other_sizes_and_removes_exactly():
    model = _build("lraspp_mobilenet_v3_large", num_classes=4)
    example = (torch.randn(1, 3, 64, 64),)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    other = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        assert type(dag(other)) is type(model(other))  # the OrderedDict of the model
        assert dagprune.max_relative_difference(model(other), dag(other)) == 0.0
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=0, count=1):
        slim = pruning.remove_channels().eval()
        with torch.no_grad():
            assert dagprune.max_relative_difference(gated.eval()(other), slim(other)) <= 1e-4


def _detections(detector, images):
    with torch.no_grad():
        return detector(images)


def _assert_same_detections(first, second):
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and torch.allclose(a[key].float(), b[key].float(), atol=1e-4)


def test_detector_backbone_prunes_and_goes_back_into_the_detector():
    detector = _build("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, min_size=128, max_size=160)
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 128)]
    expected = _detections(detector, images)
    example = (torch.rand(2, 3, 128, 160),)
    dag = dagprune.build_from_unstructured_module(detector.backbone, example_inputs=example)
    detector.backbone = dag
    _assert_same_detections(expected, _detections(detector, images))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.5
    for _ in random_gate_states(pruning, seed=1, count=1):
        detector.backbone = gated.eval()
        with_gates = _detections(detector, images)
        slim = pruning.remove_channels().eval()
        detector.backbone = slim
        _assert_same_detections(with_gates, _detections(detector, images))
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in dag.parameters())


def test_a_list_of_images_as_example_inputs_says_to_convert_the_backbone():
    detector = _build("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, min_size=128, max_size=160)
    with pytest.raises(DagpruneError, match="model.backbone"):
        dagprune.build_from_unstructured_module(detector, example_inputs=([torch.rand(3, 64, 64)],))
