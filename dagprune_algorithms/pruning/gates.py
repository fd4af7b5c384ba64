"""Gate modules: one learnable logit per channel of a group, and the ops applying masks.

The keep rule (eval mode, and what :func:`remove_channels` removes): a channel is kept iff its
logit is > 0; a group keeps at least its ``min_channels`` best channels (at least one); with
``block_size`` N > 1 the kept count is rounded up to a multiple of N (at most the group size)
by adding the channels with the next-highest logits. In train mode the gate samples a relaxed
binary mask per forward pass (a logistic-noise "Gumbel-sigmoid" with a temperature), so the
FLOPs loss can push logits down while the task loss sees the effect of closing channels.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from dagprune.errors import PruningError
from dagprune.ops import spec_for
from dagprune.ops.channel_map import along_axis
from dagprune.ops.spec import describe_op

__all__ = ["ChannelGate", "GateSet", "MaskApply", "MaskedConsumer", "keep_mask_from_logits"]


def keep_mask_from_logits(logits: torch.Tensor, block_size: int = 1, min_channels: int = 1) -> torch.Tensor:
    """The eval-mode keep decision for one group's logits (see the module docstring).

    >>> keep_mask_from_logits(torch.tensor([-1.0, 2.0, 0.5, -3.0]))
    tensor([False,  True,  True, False])
    >>> keep_mask_from_logits(torch.tensor([-1.0, -2.0]))
    tensor([ True, False])
    >>> keep_mask_from_logits(torch.tensor([-1.0, 2.0, 0.5, -3.0]), block_size=4)
    tensor([True, True, True, True])
    >>> keep_mask_from_logits(torch.tensor([-1.0, 2.0, -0.5, -3.0]), min_channels=2)
    tensor([False,  True,  True, False])
    """
    logits = logits.detach().reshape(-1)
    group_index = torch.zeros(logits.numel(), dtype=torch.long, device=logits.device)
    sizes = torch.tensor([logits.numel()], device=logits.device)
    blocks = torch.tensor([block_size], device=logits.device)
    minimums = torch.tensor([min_channels], device=logits.device)
    return grouped_keep_masks(logits, group_index, sizes, blocks, minimums)


def grouped_keep_masks(logits: torch.Tensor, group_index: torch.Tensor, sizes: torch.Tensor,
                       block_sizes: torch.Tensor, min_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The keep rule for joined logits of several groups, on the logits' device (no host sync).

    A group keeps its logits > 0; at least its best ``min_counts`` ones (default 1, and never
    fewer than one); with a block size N > 1 its count is
    rounded up to a multiple of N (at most its size) by its next-highest logits. Ties between
    equal logits go to the lower position.

    Args:
        logits: the groups' logits, joined (group 0 first).
        group_index: the group of each logit.
        sizes, block_sizes, min_counts: per group.

    Returns:
        Booleans, one per logit.
    """
    counts = torch.zeros_like(sizes).index_add_(0, group_index, (logits > 0).long())
    target = counts.clamp(min=1) if min_counts is None else torch.maximum(counts, min_counts.clamp(min=1))
    target = torch.minimum((target + block_sizes - 1) // block_sizes * block_sizes, sizes)
    return _ranks_within_groups(logits, group_index, sizes) < target[group_index]


def _ranks_within_groups(logits: torch.Tensor, group_index: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Each logit's rank in its group, highest first (ties: lower position first)."""
    if logits.dtype == torch.float32:  # one sort of (group, descending logit) keys
        order = torch.sort(_group_then_descending_keys(logits, group_index), stable=True).indices
    else:
        by_value = torch.sort(logits, descending=True, stable=True).indices
        order = by_value[torch.sort(group_index[by_value], stable=True).indices]
    starts = torch.cumsum(sizes, 0) - sizes
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - starts[group_index[order]]
    return ranks


def _group_then_descending_keys(logits: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering float32 ``logits`` by group, then by value from the highest (equal
    values get equal keys; -0.0 counts as 0.0, NaN as the highest): the float's bits read as a
    sign-magnitude integer, made monotone in the value, reversed, below the group index.

    >>> keys = _group_then_descending_keys(torch.tensor([0.5, -1.0, 2.0, -0.0, 0.0]),
    ...                                    torch.tensor([0, 0, 0, 1, 1]))
    >>> torch.sort(keys, stable=True).indices.tolist(), bool(keys[3] == keys[4])
    ([2, 0, 1, 3, 4], True)
    """
    bits = (logits + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    monotone = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # in [-2^31, 2^31)
    return group_index * (1 << 33) + ((1 << 31) - 1 - monotone)


_HARD_MASKS: "weakref.WeakKeyDictionary[ChannelGate, tuple]" = weakref.WeakKeyDictionary()
"""Each gate's latest eval-mode mask and its key (kept outside the module: never saved or copied)."""


class ChannelGate(nn.Module):
    """Holds the logits of one channel group and produces its mask.

    Args:
        num_channels: channels (classes) in the group.
        initial_logit: starting value of every logit (3.0: sigmoid = 0.95, almost fully open).
        temperature: temperature of the relaxed samples in train mode.
        block_size: kept counts are multiples of this in eval mode.
        min_channels: fewest channels kept in eval mode (at least one).

    >>> gate = ChannelGate(3).eval()
    >>> gate()
    tensor([1., 1., 1.])
    """

    def __init__(self, num_channels: int, initial_logit: float = 3.0, temperature: float = 0.5,
                 block_size: int = 1, min_channels: int = 1):
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_channels,), float(initial_logit)))
        self.temperature = temperature
        self.block_size = block_size
        self.min_channels = min_channels
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_mask", torch.ones(num_channels))
        self._frozen = False  # mirrors frozen_flag: reading it needs no device synchronisation
        self.joint: GateSet | None = None  # draws this gate's train-mode sample with its set's others
        self.joint_index = 0  # this gate's place in ``joint``

    @property
    def frozen(self) -> bool:
        """Whether the gate is frozen (saved with the state dict)."""
        return self._frozen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = bool(self.frozen_flag)

    def freeze(self, frozen: bool = True) -> None:
        """Freezes the gate at its current hard decision (or unfreezes it).

        A frozen gate returns that decision in train mode too and its logits no longer change
        the mask, so the weights adapt to exactly the model that removal will produce.
        """
        if frozen and not self.frozen:
            self.frozen_mask.copy_(keep_mask_from_logits(self.logits, self.block_size, self.min_channels))
        if frozen != self._frozen:
            self.frozen_flag.fill_(frozen)
            self._frozen = bool(frozen)

    def keep_probabilities(self) -> torch.Tensor:
        """Probability that each channel is kept, ``sigmoid(logits)`` (differentiable unless
        the gate is frozen)."""
        logits = self.logits.detach() if self.frozen else self.logits
        return torch.sigmoid(logits)

    def hard_mask(self) -> torch.Tensor:
        """The eval-mode mask as floats (1 = kept)."""
        if self.frozen:
            return self.frozen_mask.clone()
        return keep_mask_from_logits(self.logits, self.block_size, self.min_channels).to(self.logits.dtype)

    def _cached_hard_mask(self) -> torch.Tensor:
        """:meth:`hard_mask`, computed again only when the logits or the keep rule changed
        (an eval-mode forward then costs the gates nothing). The key is read on the host: the
        logits' storage and version counter (bumped by every in-place update, such as an
        optimizer step or ``with torch.no_grad(): gate.logits.copy_(...)``; a write through
        ``gate.logits.data`` bypasses the counter and is not seen until the next update)."""
        key = (self.logits.data_ptr(), self.logits._version, self.block_size, self.min_channels)
        cached = _HARD_MASKS.get(self)
        if cached is None or cached[0] != key or (cached[1].is_inference() and not torch.is_inference_mode_enabled()):
            cached = _HARD_MASKS[self] = (key, self.hard_mask())
        return cached[1]

    def forward(self) -> torch.Tensor:
        if self.frozen:
            # `0 * logits` keeps the logits in the graph (with zero gradient) so that
            # DistributedDataParallel sees every parameter used.
            return self.frozen_mask + 0.0 * self.logits
        if not self.training:
            return self._cached_hard_mask()
        if self.joint is not None:
            return self.joint.sample_for(self)
        return relaxed_sample(self.logits, 1.0 / self.temperature)

    def extra_repr(self) -> str:
        minimum = f", min_channels={self.min_channels}" if self.min_channels > 1 else ""
        return (f"channels={self.logits.numel()}, temperature={self.temperature}, "
                f"block_size={self.block_size}{minimum}")


def relaxed_sample(logits: torch.Tensor, inverse_temperature: float | torch.Tensor) -> torch.Tensor:
    """``sigmoid((logits + logistic noise) / temperature)``: the relaxed keep mask of train mode.
    The logistic noise is the logit of a uniform sample, drawn in place (fewer ops per step)."""
    noise = torch.empty_like(logits, requires_grad=False).uniform_(1e-6, 1 - 1e-6).logit_()
    return torch.sigmoid((logits + noise) * inverse_temperature)


class GateSet:
    """The gates of one pruning run, read together: a training step evaluates all their keep
    probabilities, hard masks and per-group means in a few tensor ops instead of a few per gate.

    Joined tensors list the gates' channels in order (gate 0's channels first).

    With ``joint_sampling`` the gates' train-mode samples are drawn together too: the first gate
    called draws every gate's sample (one chain of ops over the joined logits) and each gate
    takes its own part. A gate called again, or whose logits changed since the draw (an
    optimizer step, in place), or under another grad mode, starts a new draw; so does
    :meth:`new_draw` (the gated model calls it before each forward pass). Every call of a gate
    therefore gets a fresh sample, as when it draws alone.
    """

    def __init__(self, gates: list[ChannelGate], joint_sampling: bool = False):
        self.gates = list(gates)
        self.sizes = [gate.logits.numel() for gate in self.gates]
        self._group_index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._limits: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._samples: list[torch.Tensor] = []
        self._drawn_versions: list[int] = []
        self._taken: list[bool] = [True] * len(self.gates)
        self._drawn_with_grad = False
        if joint_sampling:
            for index, gate in enumerate(self.gates):
                gate.joint, gate.joint_index = self, index

    def new_draw(self, *_) -> None:
        """Makes the next gate call draw every gate's sample afresh (usable as a forward pre-hook)."""
        self._taken = [True] * len(self.gates)

    def sample_for(self, gate: ChannelGate) -> torch.Tensor:
        """``gate``'s relaxed train-mode sample, from the current joint draw or a new one."""
        i = gate.joint_index
        if (self._taken[i] or self._drawn_versions[i] != gate.logits._version
                or self._drawn_with_grad != torch.is_grad_enabled()):
            self._draw()
        self._taken[i] = True
        return self._samples[i]

    def _draw(self) -> None:
        logits = torch.cat([gate.logits for gate in self.gates])
        temperatures = {gate.temperature for gate in self.gates}
        if len(temperatures) == 1:
            inverse: float | torch.Tensor = 1.0 / temperatures.pop()
        else:
            inverse = torch.cat([torch.full((size,), 1.0 / gate.temperature, device=logits.device)
                                 for gate, size in zip(self.gates, self.sizes)])
        self._samples = list(relaxed_sample(logits, inverse).split(self.sizes))
        self._drawn_versions = [gate.logits._version for gate in self.gates]
        self._taken = [False] * len(self.gates)
        self._drawn_with_grad = torch.is_grad_enabled()

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate of each joined channel, size of each gate) on ``device``."""
        if device not in self._group_index:
            sizes = torch.tensor(self.sizes, device=device)
            self._group_index[device] = (
                torch.repeat_interleave(torch.arange(len(self.sizes), device=device), sizes), sizes)
        return self._group_index[device]

    def keep_probabilities(self) -> torch.Tensor:
        """The gates' :meth:`ChannelGate.keep_probabilities`, joined."""
        return torch.sigmoid(torch.cat([gate.logits.detach() if gate.frozen else gate.logits
                                        for gate in self.gates]))

    def hard_masks(self) -> torch.Tensor:
        """The gates' :meth:`ChannelGate.hard_mask`, joined (frozen gates give their frozen masks)."""
        if all(gate.frozen for gate in self.gates):
            return torch.cat([gate.frozen_mask for gate in self.gates])
        masks = self.masks_for_logits(torch.cat([gate.logits.detach() for gate in self.gates]))
        offset = 0
        for gate, size in zip(self.gates, self.sizes):
            if gate.frozen:
                masks[offset:offset + size] = gate.frozen_mask
            offset += size
        return masks

    def masks_for_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The keep rule (:func:`keep_mask_from_logits`, each gate's block size and minimum)
        applied to joined ``logits``, as floats, without reading anything back to the host."""
        group_index, sizes = self._index(logits.device)
        if logits.device not in self._limits:
            self._limits[logits.device] = tuple(
                torch.tensor([getattr(gate, name) for gate in self.gates], device=logits.device)
                for name in ("block_size", "min_channels"))
        keep = grouped_keep_masks(logits.detach(), group_index, sizes, *self._limits[logits.device])
        return keep.to(logits.dtype)

    def group_means(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of joined per-channel ``values`` over each gate's channels (one value per gate)."""
        group_index, sizes = self._index(values.device)
        sums = torch.zeros(len(self.sizes), dtype=values.dtype, device=values.device)
        return sums.index_add(0, group_index, values) / sizes


ENERGY_SAMPLES = 4
"""Leading batch samples the distillation energy is estimated on (keeps its cost small)."""


def energy_sample(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The part of ``x`` its energy is estimated on: the first :data:`ENERGY_SAMPLES` samples
    when axis 0 is the batch (not the channel axis), else all of it."""
    return x[:ENERGY_SAMPLES] if axis != 0 and x.ndim > 1 else x


class _PositionMasked(nn.Module):
    """Holds ``index``: which entry of ``[1, *masks]`` (the gates' masks joined, entry 0 for
    channels no gate controls) applies to each channel position of the masked tensor."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.long(), persistent=False)
        # index 1, 2, ..., n: every position gated, masks in order; the mask is the masks joined
        # (no gather on the training hot path)
        self.in_order = bool(torch.equal(self.index.cpu(), torch.arange(1, self.index.numel() + 1)))

    channel_energy: torch.Tensor | None = None
    energy_mask: torch.Tensor | None = None

    def record_energy(self, x: torch.Tensor, axis: int, mask: torch.Tensor) -> None:
        """In train mode keeps, for the distillation loss, the energy of ``x`` per position of
        ``axis`` (no gradient into ``x``; on the first :data:`ENERGY_SAMPLES` samples when axis
        0 is the batch) and the mask applied to it (see
        :func:`~dagprune_algorithms.pruning.losses.removed_energy_share`). The energy is summed
        in float32 at least: squares of float16 activations above 256 would overflow."""
        if not self.training:
            self.channel_energy = self.energy_mask = None
            return
        sample = energy_sample(x.detach(), axis)
        sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
        reduce_axes = [a for a in range(sample.ndim) if a != axis]
        squares = sample * sample
        self.channel_energy = squares.sum(reduce_axes) if reduce_axes else squares
        self.energy_mask = mask

    def position_mask(self, masks: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The per-position mask for the gates' ``masks``, as ``dtype``."""
        if self.in_order and masks:
            mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        else:
            joined = torch.cat([masks[0].new_ones(1), *masks]) if masks else self.index.new_ones(1).float()
            mask = joined[self.index]
        return mask.to(dtype)


class MaskApply(_PositionMasked):
    """Multiplies its first input by the masks of one or more gates along ``axis``."""

    def __init__(self, axis: int, index: torch.Tensor):
        super().__init__(index)
        self.axis = axis

    def forward(self, x, *masks):
        mask = self.position_mask(masks, x.dtype)
        self.record_energy(x, self.axis, mask)
        return x * along_axis(mask, self.axis, x.ndim)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, positions={self.index.numel()}"


class MaskedConsumer(_PositionMasked):
    """An op that consumes gated channels of its input 0 along ``axis``, through the masking
    facet of its spec (see :mod:`dagprune.ops.spec`).

    A conv or linear layer scales its weight or its input, whichever is smaller; a
    normalisation takes its statistics over the kept channels only, so that with hard masks it
    equals the same op with the removed channels cut out. Called with the op's original
    ``num_inputs`` inputs followed by the gates' masks.

    Args:
        layer: the op's module (the vertex's module in the ungated DAG).
        index: see :class:`_PositionMasked`.
        axis: the consumed axis of input 0.
        num_inputs: how many inputs the op itself takes.
        records_energy: keep the masked input's energy for the distillation loss (the
            input of a normalisation is counted where it is produced instead).
        scales_output: also multiply the output by the mask along ``axis``, folded into the
            op's parameters (its spec's ``scales_output``): the op's consumers then need no
            mask of their own. The energy recorded is then the unmasked output's, the tensor
            those consumers would have masked.
    """

    def __init__(self, layer: nn.Module, index: torch.Tensor, axis: int, num_inputs: int = 1,
                 records_energy: bool = True, scales_output: bool = False):
        super().__init__(index)
        self.layer = layer
        self.axis = axis
        self.num_inputs = num_inputs
        self.records_energy = records_energy or scales_output
        self.scales_output = scales_output
        spec = spec_for(layer)
        self._masking = spec.masking
        if self._masking is None:
            raise PruningError(f"{describe_op(layer)} has no masking facet in its op spec")
        if scales_output and not spec.scales_output:
            raise PruningError(f"{describe_op(layer)} cannot fold a mask into its output (no scales_output "
                               "in its op spec)")

    def forward(self, *inputs):
        inputs, masks = inputs[:self.num_inputs], inputs[self.num_inputs:]
        mask = self.position_mask(masks, inputs[0].dtype)
        if not self.scales_output:
            if self.records_energy:
                self.record_energy(inputs[0], self.axis, mask)
            return self._masking(self.layer, inputs, mask, self.axis)
        if self.training:
            with torch.no_grad():  # rows are independent: the unmasked output of a few samples
                sample = (energy_sample(inputs[0], self.axis), *inputs[1:])
                self.record_energy(self._masking(self.layer, sample, mask, self.axis), self.axis, mask)
        else:
            self.channel_energy = self.energy_mask = None
        return self._masking(self.layer, inputs, mask, self.axis, output_scale=mask)

    def extra_repr(self) -> str:
        folded = ", scales_output=True" if self.scales_output else ""
        return f"axis={self.axis}, positions={self.index.numel()}{folded}"
