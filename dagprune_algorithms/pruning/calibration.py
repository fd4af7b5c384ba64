"""Landing the hard model near its target: flipping the least certain gate decisions, moving
whole blocks, and checking a predicted budget against measurements.

:func:`calibrated_logits` orders the channels by how close their logit is to the decision
boundary and applies the shortest prefix of flips (closing open channels when above the
target, opening closed ones when below) that brings the hard share closest to the target, by
moving those logits just across zero; every group keeps a channel.

With ``round_to`` or ``block_size`` N > 1 a group's kept count moves in steps of N channels,
so flipping channels one at a time in logit order (:meth:`.ChannelPruning.calibrate_to_target`)
can only stop at the step where some group crosses a multiple, which may lie a whole block of
a wide layer away from the target. :func:`refine_block_counts` then moves whole blocks: from
the kept counts reached, it repeatedly opens or closes one block in the group where that brings
the share nearest the target, until no single block move does better. Within a group the
channels kept are always its highest logits, so the move changes how many channels are kept,
never which ones rank first.

:func:`match_measured_share` closes the loop on a budget that is only predicted (latency): it
times the slim model, compares the measured share with the predicted one, and calibrates the
gates again to a corrected aim (:func:`next_aim`: scaled by the measured / predicted ratio
until rounds measured on both sides of the target bracket it, then interpolated between them),
for a few rounds, keeping the gates of the round measured nearest the target.
"""

from __future__ import annotations

from statistics import fmean
from typing import Callable, Sequence

import torch

__all__ = ["calibrated_logits", "refine_block_counts", "logits_keeping", "match_measured_share", "next_aim", "bracket"]


def calibrated_logits(gates: Sequence, gate_set, share_of: Callable[[torch.Tensor], float],
                      target: float) -> list[torch.Tensor]:
    """Each gate's logits after the flips (and block moves) that land the hard share of
    ``share_of`` nearest ``target`` (see the module docstring); on the CPU.

    Args:
        gates: the run's :class:`~.gates.ChannelGate` s.
        gate_set: their :class:`~.gates.GateSet` (its keep rule turns joined logits into masks).
        share_of: the budget share of joined keep masks.
        target: the share to land nearest.
    """
    with torch.no_grad():
        logits = torch.cat([gate.logits.detach() for gate in gates]).cpu()
        keep = gate_set.hard_masks().cpu()
        closing = share_of(keep) > target
        order = _flip_order(gates, logits, keep, closing)

        def share(count: int) -> float:
            trial = logits.clone()
            trial[order[:count]] = -0.05 if closing else 0.05
            return share_of(gate_set.masks_for_logits(trial))

        low, high = 0, len(order)  # share(count) is monotone in count
        while low < high:
            middle = (low + high) // 2
            crossed = share(middle) <= target if closing else share(middle) >= target
            low, high = (low, middle) if crossed else (middle + 1, high)
        count = min((c for c in (low - 1, low) if 0 <= c <= len(order)), key=lambda c: abs(share(c) - target))
        flipped = logits.clone()
        flipped[order[:count]] = -0.05 if closing else 0.05
        per_gate = list(flipped.split([gate.logits.numel() for gate in gates]))
        if not any(gate.block_size > 1 for gate in gates):
            return per_gate
        counts = refine_block_counts(per_gate, [gate.block_size for gate in gates],
                                     [gate.min_channels for gate in gates], share_of, target)
        return per_gate if counts is None else [logits_keeping(g, c) for g, c in zip(per_gate, counts)]


def _flip_order(gates: Sequence, logits: torch.Tensor, keep: torch.Tensor, closing: bool) -> torch.Tensor:
    """Joined channel positions in the order they are flipped: open ones from the lowest logit
    when closing (never a group's best channel), closed ones from the highest when opening."""
    candidates = torch.nonzero(keep > 0.5 if closing else keep < 0.5).flatten()
    order = candidates[logits[candidates].argsort(descending=not closing)]
    if not closing:
        return order
    offsets, protected = 0, set()
    for gate in gates:
        protected.add(offsets + int(gate.logits.detach().argmax()))
        offsets += gate.logits.numel()
    return torch.tensor([int(i) for i in order if int(i) not in protected], dtype=torch.long)


def refine_block_counts(logits: Sequence[torch.Tensor], blocks: Sequence[int], minimums: Sequence[int],
                        share_of: Callable[[torch.Tensor], float], target: float) -> list[int] | None:
    """Kept counts, one per group, whose share lies nearest ``target``; None when no block move
    improves on the counts the logits keep now.

    Args:
        logits: each group's logits (their ranks decide which channels a count keeps).
        blocks: each group's block size (kept counts are multiples of it, or the whole group).
        minimums: each group's fewest kept channels (after rounding to its block).
        share_of: the budget share of joined keep masks (one float per channel, groups joined).
        target: the share to land nearest.
    """
    ranks = [torch.argsort(torch.argsort(group, descending=True, stable=True)) for group in logits]
    counts = [int((group > 0).sum()) for group in logits]
    counts = [_round_up(max(count, minimum, 1), block, rank.numel())
              for count, block, minimum, rank in zip(counts, blocks, minimums, ranks)]

    def share(trial: list[int]) -> float:
        return share_of(torch.cat([(rank < count).float() for rank, count in zip(ranks, trial)]))

    best, distance, improved = counts, abs(share(counts) - target), False
    for _ in range(4 * len(counts) + 4):
        moves = [moved for i in range(len(best)) for moved in _block_moves(best, i, blocks[i], minimums[i],
                                                                            ranks[i].numel())]
        if not moves:
            break
        nearest, moved = min(((abs(share(moved) - target), moved) for moved in moves), key=lambda item: item[0])
        if nearest >= distance - 1e-12:
            break
        distance, best, improved = nearest, moved, True
    return best if improved else None


def match_measured_share(pruning, measured_share: Callable[[], float], rounds: int = 5,
                         tolerance: float = 0.02) -> list[dict]:
    """Calibrates ``pruning``'s gates until the *measured* share of the slim model lies within
    ``tolerance`` (relative) of :attr:`~.ChannelPruning.pruning_proportion`.

    Each round calls ``measured_share()`` (the slim model of the current gates, timed against
    the original, as the caller measures it: the same way in every process of a distributed
    run) and stops when the model's measurements (their mean, for a model measured more than
    once) are close enough. Otherwise it picks the next predicted share to aim at
    (:func:`next_aim`: the target corrected by the nearest model's measured / predicted ratio
    until models measured on both sides bracket the target, then interpolated between the
    nearest two, a side's distance halved for every round it stays the same, so that one
    mismeasured model cannot hold the search) and calibrates the gates *as they were given* to
    it with :meth:`~.ChannelPruning.calibrate_to_target`, frozen gates refrozen at the new
    decisions, so an aim always gives the same model; landing on a model already measured
    measures it again. The gates of the model measured nearest the target are kept.

    Args:
        pruning: a prepared :class:`~.channel_pruning.ChannelPruning`.
        measured_share: returns the measured share of the current hard model.
        rounds: recalibrations at most.
        tolerance: relative distance to the target that ends the loop.

    Returns:
        One record per measurement: ``predicted`` and ``measured`` shares, and the ``aim``
        the next calibration used (None for the last).
    """
    target, gates = pruning.pruning_proportion, pruning.gates
    frozen = [gate.frozen for gate in gates]
    floor = 1.0 - pruning.max_removable_proportion
    given = _gate_state(gates)
    records, models, held, previous = [], {}, {}, None
    for round_index in range(rounds + 1):
        predicted, measured = pruning.current_hard_proportion(), float(measured_share())
        records.append({"predicted": predicted, "measured": measured, "aim": None})
        model = models.setdefault(round(predicted, 12), {"measured": [], "state": _gate_state(gates)})
        model["measured"].append(measured)
        if abs(fmean(model["measured"]) - target) <= tolerance * target or round_index == rounds or measured <= 0:
            break
        points = [(p, fmean(m["measured"])) for p, m in models.items()]
        sides = bracket(points, target)
        for side in sides or ():
            held[side[0]] = held.get(side[0], -1) + 1 if previous and side in previous else 0
        previous = sides
        records[-1]["aim"] = aim = next_aim(points, target, floor, held)
        _restore_gate_state(gates, given)
        for gate in gates:
            gate.freeze(False)
        pruning.calibrate_to_target(aim)
        for gate, was_frozen in zip(gates, frozen):
            gate.freeze(was_frozen)
    nearest = min(models.values(), key=lambda m: abs(fmean(m["measured"]) - target))
    _restore_gate_state(gates, nearest["state"])
    return records


def bracket(rounds: Sequence[tuple[float, float]], target: float) -> tuple[tuple, tuple] | None:
    """The ``(predicted, measured)`` rounds measured nearest below and above ``target``, when
    there are both and the one above was predicted higher (the measured share grows with the
    predicted one); None otherwise."""
    below = [r for r in rounds if r[1] < target]
    above = [r for r in rounds if r[1] > target]
    if not (below and above):
        return None
    low, high = max(below, key=lambda r: r[1]), min(above, key=lambda r: r[1])
    return (low, high) if high[0] > low[0] else None


def next_aim(rounds: Sequence[tuple[float, float]], target: float, floor: float = 0.0,
             held: dict | None = None) -> float:
    """The predicted share to calibrate to next, from the ``(predicted, measured)`` shares of the
    rounds so far: interpolated within the :func:`bracket` when there is one, each side's
    distance to the target halved once per round it has been held (``held``, by predicted share:
    the Illinois rule, which keeps a side that stays from slowing the search), otherwise the
    target scaled by the nearest round's predicted / measured ratio (its error assumed to
    scale); within [``floor``, 1].

    >>> next_aim([(0.5, 0.6)], 0.5)  # measured 20% above the prediction: aim 20% lower
    0.4166666666666667
    >>> round(next_aim([(0.5, 0.6), (0.42, 0.35)], 0.5), 4)  # between the two rounds
    0.468
    >>> round(next_aim([(0.5, 0.6), (0.42, 0.35)], 0.5, held={0.5: 1}), 4)  # 0.6 counts as 0.55
    0.48
    """
    sides = bracket(rounds, target)
    if sides is not None:
        (low_p, low_m), (high_p, high_m) = sides
        held = held or {}
        low_m = target - (target - low_m) * 0.5 ** held.get(low_p, 0)
        high_m = target + (high_m - target) * 0.5 ** held.get(high_p, 0)
        return min(max(low_p + (target - low_m) * (high_p - low_p) / (high_m - low_m), floor), 1.0)
    predicted, measured = min(rounds, key=lambda r: abs(r[1] - target))
    return min(max(target * predicted / measured, floor), 1.0)


def _gate_state(gates: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(gate.logits.detach().clone(), gate.frozen_mask.clone()) for gate in gates]


def _restore_gate_state(gates: Sequence, state: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for gate, (logits, mask) in zip(gates, state):
            gate.logits.copy_(logits)
            gate.frozen_mask.copy_(mask)


def logits_keeping(logits: torch.Tensor, count: int, margin: float = 0.05) -> torch.Tensor:
    """``logits`` moved just across zero where needed so that exactly the ``count`` highest are
    positive (ties: lower position first, as the keep rule ranks them)."""
    rank = torch.argsort(torch.argsort(logits, descending=True, stable=True))
    kept = rank < count
    return torch.where(kept, logits.clamp(min=margin), logits.clamp(max=-margin))


def _round_up(count: int, block: int, size: int) -> int:
    return min(-(-count // block) * block, size)


def _block_moves(counts: list[int], index: int, block: int, minimum: int, size: int) -> list[list[int]]:
    """The counts with group ``index`` one block smaller and one block larger, where allowed."""
    moves = []
    current = counts[index]
    smaller = (current - 1) // block * block  # the multiple below (a whole group may not be one)
    if smaller >= max(_round_up(max(minimum, 1), block, size), 1) and smaller < current:
        moves.append(counts[:index] + [smaller] + counts[index + 1:])
    larger = _round_up(current + 1, block, size)
    if larger > current:
        moves.append(counts[:index] + [larger] + counts[index + 1:])
    return moves
