"""Channel pruning: channel groups, gates, FLOPs-constrained losses and exact channel removal."""

from dagprune_algorithms.pruning.budgets import BUDGETS
from dagprune_algorithms.pruning.channel_groups import (ChannelAnalysis, ChannelGroup,
                                                        CouplingContext, find_channel_groups)
from dagprune_algorithms.pruning.channel_pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_removal import remove_channels_from_dag
from dagprune_algorithms.pruning.flops_api import compute_flops, compute_normalized_flops
from dagprune_algorithms.pruning.latency_table import LatencyTable, measure_latency_table
from dagprune_algorithms.pruning.gates import ChannelGate, MaskApply, MaskedConsumer, keep_mask_from_logits
from dagprune_algorithms.pruning.losses import logit_distillation_loss
from dagprune_algorithms.pruning.width_table import WidthTable, measure_width_table

__all__ = [
    "ChannelPruning", "ChannelGroup", "ChannelAnalysis", "CouplingContext", "find_channel_groups",
    "remove_channels_from_dag",
    "compute_flops", "compute_normalized_flops", "ChannelGate", "MaskApply", "MaskedConsumer",
    "keep_mask_from_logits", "logit_distillation_loss", "BUDGETS", "LatencyTable", "measure_latency_table",
    "WidthTable", "measure_width_table",
]

from dagprune_algorithms.pruning.units import (CHANNEL_UNIT_TYPES, ChannelUnit, ChannelUnitError,  # noqa: E402
                                               SequentialChannelUnit, register_channel_unit)
from dagprune_algorithms.pruning.mutator import ChannelMutator  # noqa: E402
from dagprune_algorithms.pruning.iterative import (IterativePlan, ItePruneAlgorithm,  # noqa: E402
                                                   choices_for_flops_target, plan_iterative_pruning,
                                                   prune_iteratively)

__all__ += ["ChannelMutator", "ChannelUnit", "SequentialChannelUnit", "ChannelUnitError",
            "register_channel_unit", "CHANNEL_UNIT_TYPES", "ItePruneAlgorithm", "choices_for_flops_target",
            "IterativePlan", "plan_iterative_pruning", "prune_iteratively"]
