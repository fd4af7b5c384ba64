"""One small timm model per family named in issue 2 / spec 004, for conversion and I/O tests.

``TIMM_FAMILY_MODELS`` is the named data the tests parametrize over (one entry per family, with
the reason for any non-default setting); ``create_timm_model`` builds an entry with weights that
make equivalence tests sensitive (see :func:`make_weights_informative`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from informative_weights import make_weights_informative

CNN_INPUT = (3, 64, 64)
VIT_KWARGS = (("img_size", 64),)  # ViT-like models have a fixed input size: rebuild them at 64 px


@dataclasses.dataclass(frozen=True)
class TimmCase:
    """A timm model and how to build it small.

    Attributes:
        name: the timm model name (built with ``pretrained=False``).
        kwargs: extra ``timm.create_model`` arguments, as ``(key, value)`` pairs.
        input_size: input shape without batch.
        slow: run only with ``-m slow`` (kept for models whose test takes several seconds).
    """

    name: str
    kwargs: Tuple[Tuple[str, object], ...] = ()
    input_size: Tuple[int, ...] = CNN_INPUT
    slow: bool = False


TIMM_FAMILY_MODELS: Dict[str, TimmCase] = {
    "resnet": TimmCase("resnet10t"),
    "resnext": TimmCase("resnext26ts"),
    "seresnet": TimmCase("seresnet18"),
    "seresnext": TimmCase("seresnext26ts"),
    "regnet": TimmCase("regnetx_002"),
    "mobilenetv2": TimmCase("mobilenetv2_035"),
    "mobilenetv3": TimmCase("mobilenetv3_small_050"),
    "tf_mobilenetv3": TimmCase("tf_mobilenetv3_small_minimal_100"),  # TF "SAME" padding
    "efficientnet": TimmCase("efficientnet_b0"),
    "tf_efficientnet": TimmCase("tf_efficientnet_b0"),  # TF "SAME" padding, asymmetric at 64 px
    "fbnet": TimmCase("fbnetc_100"),
    "hardcorenas": TimmCase("hardcorenas_a"),
    "densenet": TimmCase("densenet121"),  # the smallest densenet
    "dla": TimmCase("dla46_c"),
    "nfnet": TimmCase("nf_regnet_b0"),  # weight-standardised convs, no norm layers
    "hrnet": TimmCase("hrnet_w18_small"),
    "convnext": TimmCase("convnext_atto"),
    "convnextv2": TimmCase("convnextv2_atto"),
    "poolformer": TimmCase("poolformer_s12"),
    "caformer": TimmCase("caformer_s18"),
    "repvit": TimmCase("repvit_m0_9"),
    "efficientformerv2": TimmCase("efficientformerv2_s0", VIT_KWARGS),  # attention bias per size
    "deit3": TimmCase("deit3_small_patch16_224", VIT_KWARGS),
    "vit": TimmCase("vit_tiny_patch16_224", VIT_KWARGS),
    "flexivit": TimmCase("flexivit_small", VIT_KWARGS),
    "beit": TimmCase("beit_base_patch16_224", VIT_KWARGS),  # the smallest beit (86M parameters)
}
"""Family -> the model that stands for it."""


def timm_params():
    """``pytest.param`` per family, marked ``slow`` where the case says so."""
    return [pytest.param(case, id=f"{family}-{case.name}",
                         marks=[pytest.mark.slow] if case.slow else [])
            for family, case in TIMM_FAMILY_MODELS.items()]


def create_timm_model(case: TimmCase, seed: int = 0) -> nn.Module:
    """``case``'s model with seeded, informative weights; the global RNG is left untouched."""
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(case.name, pretrained=False, **dict(case.kwargs))
    return make_weights_informative(model, seed)
