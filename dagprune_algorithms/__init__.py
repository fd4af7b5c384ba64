"""Algorithms over dagprune's IR: channel pruning (differentiable and mmrazor-style)."""

from dagprune_algorithms import pruning

__all__ = ["pruning"]
