"""Switching modules to eval mode temporarily, restoring every submodule's own mode after.

Restoring with ``module.train(previous)`` is wrong when submodules are shared between models
(a gated DAG shares its layers with the DAG it was made from): it would flip the shared layers
of the other model too. :func:`evaluation_mode` restores each submodule's own flag instead.
"""

from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["evaluation_mode", "module_mode"]


@contextlib.contextmanager
def module_mode(*modules: nn.Module, training: bool):
    """Puts ``modules`` in train (``training=True``) or eval mode for the ``with`` block;
    restores every submodule's own flag after."""
    previous = {module: module.training for root in modules for module in root.modules()}
    for root in modules:
        root.train(training)
    try:
        yield
    finally:
        for module, was_training in previous.items():
            if module.training != was_training:  # nn.Module.__setattr__ is slow; most are unchanged
                module.training = was_training


def evaluation_mode(*modules: nn.Module):
    """Puts ``modules`` in eval mode for the ``with`` block; restores every submodule's flag.

    >>> shared = nn.BatchNorm1d(2)
    >>> first, second = nn.Sequential(shared).eval(), nn.Sequential(shared)
    >>> with evaluation_mode(second):
    ...     pass
    >>> shared.training
    False
    """
    return module_mode(*modules, training=False)
