"""``torch.einsum``: channels follow the equation's letters.

Each letter names one index: the axes that carry it in the operands are the same channels
(unified), and so is the output axis that keeps it. A letter summed away (absent from the
output) is a contraction over those channels: the op consumes them, so a gate's mask applies
to one operand there and removing the channels from every operand drops exactly the masked
terms. An index that a tracked operand shares with an untracked one (a constant table) is a
barrier, as in elementwise ops; an axis of size 1 broadcast against a longer one takes no part.
Repeated letters within one operand (diagonals) and products of more than two operands (whose
FLOPs depend on the contraction order torch picks) are not followed: the op is then opaque.

FLOPs: the product of two operands is a batched matrix product over the indices both share or
the output keeps, ``2 x`` the product of their sizes, and scales with the kept share of each.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import torch
from torch import nn

from dagprune.ops.channel_map import tensor_layout
from dagprune.ops.flop_counting import measured_flops
from dagprune.ops.linear_algebra import EinsumOp
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec, opaque_coupling
from dagprune.ops.templates import InputRef

__all__ = ["SPECS", "einsum_coupling", "einsum_flops", "einsum_subscripts"]


def einsum_subscripts(equation: str, ndims: list[int]) -> tuple[list[list], list] | None:
    """The index of every axis of each operand and of the output: a letter, or
    ``("...", k)`` for the k-th broadcast axis counted from the right. None for what is not
    followed (a letter repeated within one operand, an equation that does not fit the operands).

    >>> einsum_subscripts("bhwc,hkc->bhwk", [4, 3])
    ([['b', 'h', 'w', 'c'], ['h', 'k', 'c']], ['b', 'h', 'w', 'k'])
    >>> einsum_subscripts("...ij,jk", [3, 2])
    ([[('...', 0), 'i', 'j'], ['j', 'k']], [('...', 0), 'i', 'k'])
    >>> einsum_subscripts("ii->i", [2]) is None
    True
    """
    left, arrow, right = equation.replace(" ", "").partition("->")
    terms = left.split(",")
    if len(terms) != len(ndims):
        return None
    inputs = [_term_indices(term, ndim) for term, ndim in zip(terms, ndims)]
    if any(indices is None or len(set(indices)) != len(indices) for indices in inputs):
        return None
    broadcast = max((sum(isinstance(i, tuple) for i in indices) for indices in inputs), default=0)
    if arrow:
        output = _term_indices(right, None, broadcast)
    else:  # implicit output: the broadcast axes, then the letters used once, alphabetically
        counts = collections.Counter(i for indices in inputs for i in indices if isinstance(i, str))
        output = [("...", k) for k in reversed(range(broadcast))] + sorted(i for i, n in counts.items() if n == 1)
    if output is None or len(set(output)) != len(output):
        return None
    return inputs, output


def _term_indices(term: str, ndim: int | None, broadcast: int = 0) -> list | None:
    if "..." not in term:
        return list(term) if ndim is None or len(term) == ndim else None
    head, _, tail = term.partition("...")
    width = broadcast if ndim is None else ndim - len(head) - len(tail)
    if width < 0 or "." in head + tail:
        return None
    return [*head, *[("...", k) for k in reversed(range(width))], *tail]


def einsum_flops(module, inputs, output) -> int:
    """``2 x`` the product of the sizes of the indices both operands share or the output keeps
    (the batched matrix product a two-operand einsum is), whatever kernel torch picks for a
    degenerate size; one operand: 0 (sums and transposes); more: measured."""
    equation, operands = _operand_inputs(module)
    parsed = None
    if equation is not None and None not in operands and len(operands) <= 2 \
            and all(isinstance(inputs[i], torch.Tensor) for i in operands):
        parsed = einsum_subscripts(equation, [inputs[i].ndim for i in operands])
    if parsed is None:
        return measured_flops(module, inputs, output)
    if len(operands) < 2:
        return 0
    sizes: dict = {}
    for operand, indices in zip(operands, parsed[0]):
        for axis, index in enumerate(indices):
            sizes.setdefault(index, []).append(inputs[operand].shape[axis])
    counted = [max(found) for index, found in sizes.items() if len(found) > 1 or index in parsed[1]]
    return 2 * math.prod(counted)


def _operand_inputs(module) -> tuple[str | None, list]:
    """The equation and, per operand, the index of the op input it is (None: a constant)."""
    args = module.args
    if not args or not isinstance(args[0], str):
        return None, []
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return args[0], [item.index if isinstance(item, InputRef) else None for item in operands]


def einsum_coupling(ctx, vertex, module, layouts, values, output):
    """The channel map of ``torch.einsum`` (see the module docstring)."""
    equation, operands = _operand_inputs(module)
    if equation is None or None in operands or len(operands) > 2 or not isinstance(output, torch.Tensor) \
            or not all(isinstance(values[i], torch.Tensor) for i in operands):
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    parsed = einsum_subscripts(equation, [values[i].ndim for i in operands])
    if parsed is None or len(parsed[1]) != output.ndim:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    inputs, output_indices = parsed
    places = collections.defaultdict(list)  # index -> [(input, axis, atoms, size)]
    for operand, indices in zip(operands, inputs):
        layout = tensor_layout(layouts[operand])
        for axis, index in enumerate(indices):
            places[index].append((operand, axis, layout.get(axis), values[operand].shape[axis]))
    out_axis = {index: axis for axis, index in enumerate(output_indices)}
    result, factors = {}, []
    for index, where in places.items():
        atoms = _couple_index(ctx, where)
        if atoms is None:
            continue
        if index in out_axis or len(where) > 1:  # a sum within one operand is not multiplied
            factors.append(atoms)
        if index in out_axis:
            result[out_axis[index]] = atoms
        else:
            operand, axis = next((operand, axis) for operand, axis, tracked, _ in where if tracked is not None)
            ctx.consume(vertex, operand, axis, atoms)
    ctx.count_flops(vertex, einsum_flops(module, values, output), factors)
    return result or None


def _couple_index(ctx, where: list) -> Any:
    """Unifies the tracked axes of one index; returns their atoms, or None where the index
    carries no channels or is barred (tracked in some operands, untracked in others)."""
    size = max(place[3] for place in where)
    joined = [place for place in where if place[3] == size]
    for *_, atoms, length in where:
        if length != size and atoms is not None:  # a tracked axis broadcast against a longer one
            ctx.barrier(atoms, "einsum broadcasts a channel axis")
    tracked = [atoms for *_, atoms, _ in joined if atoms is not None]
    if not tracked or size < 2:
        for atoms in tracked:
            ctx.barrier(atoms, "einsum axis of one position")
        return None
    if len(tracked) < len(joined):
        for atoms in tracked:
            ctx.barrier(atoms, "einsum index shared with an untracked operand")
        return None
    for atoms in tracked[1:]:
        ctx.unify(tracked[0], atoms)
    return tracked[0]


class _RelativeQueryBias(nn.Module):
    """Query-times-table scores (SAM ViT's decomposed relative positions) and a projection
    written as einsums, with a sum over heads' dims."""

    def __init__(self):
        super().__init__()
        self.query, self.value, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.randn(5, 5, 8))

    def forward(self, x):
        scores = torch.einsum("bqc,qkc->bqk", self.query(x), self.table).softmax(-1)
        mixed = torch.einsum("bqk,bkc->bqc", scores, self.value(x))
        return self.head(mixed) + torch.einsum("bqc->bq", self.query(x)).unsqueeze(-1)


SPECS = (
    OpSpec("einsum", (EinsumOp,), flops=einsum_flops, coupling=einsum_coupling,
           removal=unchanged_removal, example=lambda: (_RelativeQueryBias(), (torch.randn(2, 5, 6),))),
)
