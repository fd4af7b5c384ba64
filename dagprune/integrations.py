"""dagprune's support for optional libraries, loaded only when a model needs it.

dagprune works without timm and torchvision, and ``import dagprune`` imports neither. Their
support, :mod:`dagprune.timm_layers` and :mod:`dagprune.torchvision_layers`, imports the library
and registers its layers in :mod:`dagprune.leaf_modules`. It is loaded

* before a model is converted, if the process has imported the library (only then can the model
  hold its layers): :func:`load_support_for_imported_libraries`;
* before a saved DAG is loaded, if its graph names the library's types or functions:
  :func:`load_support_for_graph`.

Tracing and loading depend on this module, and it depends on the support modules, which depend
only on the registries and ops below them; so the imports point one way.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from dagprune.errors import SerializationError

__all__ = ["load_support_for_imported_libraries", "load_support_for_graph"]


def _load_timm_support() -> None:
    import dagprune.timm_layers  # noqa: F401  (registers timm's rewrites, leaves and functions)


def _load_torchvision_support() -> None:
    import dagprune.torchvision_layers  # noqa: F401  (registers torchvision's rewrites and leaves)


def _load_transformers_support() -> None:
    import dagprune.transformers_layers  # noqa: F401  (registers the rewrite of GPT-2's Conv1D)


# optional library (top-level package name) -> the function registering dagprune's support for it
_SUPPORT_LOADERS: dict[str, Callable[[], None]] = {"timm": _load_timm_support,
                                                   "torchvision": _load_torchvision_support,
                                                   "transformers": _load_transformers_support}


def load_support_for_imported_libraries() -> list[str]:
    """Loads the support for every optional library that the process has already imported.

    Returns:
        The names of those libraries, e.g. ``["timm"]``.
    """
    imported = [library for library in _SUPPORT_LOADERS if library in sys.modules]
    for library in imported:
        _SUPPORT_LOADERS[library]()
    return imported


def load_support_for_graph(graph: Any) -> list[str]:
    """Loads the support for every optional library whose types or functions ``graph`` names.

    Args:
        graph: the JSON data of a saved graph, where types and functions are stored by their
            qualified names (``"timm.layers.norm_act.BatchNormAct2d"``).

    Returns:
        The names of those libraries.

    Raises:
        SerializationError: a library the graph needs is not installed.

    >>> load_support_for_graph({"type": "torch.nn.Conv2d", "config": {"in_channels": 3}})
    []
    """
    text = json.dumps(graph)
    named = [library for library in _SUPPORT_LOADERS if f'"{library}.' in text]
    for library in named:
        try:
            _SUPPORT_LOADERS[library]()
        except ModuleNotFoundError as error:
            raise SerializationError(f"the saved DAG holds {library} layers or functions, but "
                                     f"{library} cannot be imported ({error}); install {library} "
                                     "to load it") from error
    return named
