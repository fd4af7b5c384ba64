"""dagprune: PyTorch models as explicit DAGs that can be edited, measured and saved.

This package is the IR: conversion (:func:`build_from_unstructured_module`), the
:class:`DagModule` and its vertices, the op modules, FLOPs counting and source-free saving.
Pruning algorithms live in :mod:`dagprune_algorithms`.
"""

from dagprune import errors, ops
from dagprune.compare import compare_module_outputs, max_relative_difference
from dagprune.dag_module import DagModule, InnerVertex, InputVertex, Vertex
from dagprune.io import load_dag, load_dag_from_path, save_dag
from dagprune.module_serialization import register_module_serializer
from dagprune.tracing import (build_from_unstructured_module, register_leaf_module,
                              register_module_rewrite)

__version__ = "0.1.0"

__all__ = [
    "DagModule", "Vertex", "InputVertex", "InnerVertex", "build_from_unstructured_module",
    "register_leaf_module", "register_module_rewrite", "register_module_serializer",
    "compare_module_outputs", "max_relative_difference", "save_dag", "load_dag",
    "load_dag_from_path", "errors", "ops",
]

from dagprune.flops import FlopsReport, count_flops, register_flops  # noqa: E402
from dagprune.shape_prop import propagate_shapes  # noqa: E402
from dagprune.training_mode import evaluation_mode  # noqa: E402

__all__ += ["count_flops", "FlopsReport", "register_flops", "propagate_shapes", "evaluation_mode"]
