"""Support for torchvision layers that torch.fx cannot trace faithfully.

Loaded by :mod:`dagprune.integrations` when a model is converted while torchvision is imported,
or when a saved graph names torchvision types or functions. Like :mod:`dagprune.timm_layers`, it
depends only on the registries of :mod:`dagprune.leaf_modules` and on :mod:`dagprune.ops`. It
registers:

* a rewrite of ``torchvision.ops.StochasticDepth`` in ``"row"`` mode (EfficientNet, ConvNeXt,
  Swin, MaxViT...) into :class:`~dagprune.ops.StochasticDepth`, which draws the same random
  numbers, keeps dropping paths in train mode and is saved without naming torchvision (traced,
  torchvision's layer becomes a call to its ``fx.wrap``-ped ``stochastic_depth`` with
  ``training`` frozen at its trace-time value). ``"batch"`` mode (one draw for the whole batch)
  has no dagprune equivalent: such layers are kept whole;
* Swin's shifted-window attention layers as leaves: their window padding and shifts branch on
  sizes in Python, which torch.fx cannot trace (torchvision ``fx.wrap``-s the function they call);
  kept whole, they still apply their dropouts in train mode;
* torchvision's other ``fx.wrap``-ped functions used by classifiers (Swin's patch-merging pad)
  and its ``stochastic_depth`` as storable functions; likewise for the video models (Swin3D's
  shifted-window attention kept whole, its and MViT's helpers storable; their channels are not
  followed through those helpers). A DAG calling them names torchvision, and
  loading it imports torchvision (see :func:`dagprune.integrations.load_support_for_graph`).
"""

from __future__ import annotations

import importlib

from dagprune.leaf_modules import register_autowrap_function, register_leaf_module, register_module_rewrite
from dagprune.ops.functions import register_function
from dagprune.ops.stochastic_depth import StochasticDepth

__all__: list[str] = []

# torchvision.ops re-exports functions named like its submodules, so import them by path.
_stochastic_depth = importlib.import_module("torchvision.ops.stochastic_depth")
_swin = importlib.import_module("torchvision.models.swin_transformer")


def _is_batch_mode(module) -> bool:
    return module.mode == "batch"


@register_module_rewrite(_stochastic_depth.StochasticDepth)
def _rewrite_stochastic_depth(module):
    if _is_batch_mode(module):
        return module  # kept whole as a leaf, below
    # torchvision always divides the kept rows by the survival rate (scale_by_keep)
    return StochasticDepth(module.p, scale_by_keep=True).train(module.training)


register_leaf_module(_stochastic_depth.StochasticDepth, when=_is_batch_mode)
register_function(_stochastic_depth.stochastic_depth)

register_leaf_module(_swin.ShiftedWindowAttention)
register_leaf_module(_swin.ShiftedWindowAttentionV2)
register_autowrap_function(_swin._patch_merging_pad)
register_function(_swin._get_relative_position_bias)
register_function(_swin.shifted_window_attention)

# video models: Swin3D's shifted-window attention whole, as in 2-d; its and MViT's fx.wrap-ped
# helpers (window and padding sizes, masks, pooled-attention reshapes) as storable functions
_swin3d = importlib.import_module("torchvision.models.video.swin_transformer")
_mvit = importlib.import_module("torchvision.models.video.mvit")
register_leaf_module(_swin3d.ShiftedWindowAttention3d)
for _function in (_swin3d._get_window_and_shift_size, _swin3d._get_relative_position_bias,
                  _swin3d._compute_pad_size_3d, _swin3d._compute_attention_mask_3d,
                  _swin3d.shifted_window_attention_3d, _mvit._unsqueeze, _mvit._squeeze,
                  _mvit._add_rel_pos, _mvit._add_shortcut):
    register_function(_function)
