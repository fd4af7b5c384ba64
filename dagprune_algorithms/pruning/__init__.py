"""Channel pruning: channel groups, gates, FLOPs-constrained losses and exact channel removal."""

from dagprune_algorithms.pruning.channel_groups import (ChannelAnalysis, ChannelGroup,
                                                        CouplingContext, find_channel_groups)
from dagprune_algorithms.pruning.channel_pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_removal import (register_channel_removal,
                                                         remove_channels_from_dag)
from dagprune_algorithms.pruning.coupling_rules import register_coupling_rule
from dagprune_algorithms.pruning.flops_api import compute_flops, compute_normalized_flops
from dagprune_algorithms.pruning.gates import ChannelGate, MaskApply, MaskedNorm, keep_mask_from_logits

__all__ = [
    "ChannelPruning", "ChannelGroup", "ChannelAnalysis", "CouplingContext", "find_channel_groups",
    "register_coupling_rule", "register_channel_removal", "remove_channels_from_dag",
    "compute_flops", "compute_normalized_flops", "ChannelGate", "MaskApply", "MaskedNorm",
    "keep_mask_from_logits",
]

from dagprune_algorithms.pruning.units import (CHANNEL_UNIT_TYPES, ChannelMutator, ChannelUnit,  # noqa: E402
                                               ChannelUnitError, SequentialChannelUnit,
                                               register_channel_unit)
from dagprune_algorithms.pruning.iterative import ItePruneAlgorithm, choices_for_flops_target  # noqa: E402

__all__ += ["ChannelMutator", "ChannelUnit", "SequentialChannelUnit", "ChannelUnitError",
            "register_channel_unit", "CHANNEL_UNIT_TYPES", "ItePruneAlgorithm", "choices_for_flops_target"]
