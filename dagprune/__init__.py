"""dagprune: PyTorch models as explicit DAGs that can be edited, measured and saved.

This package is the IR: conversion (:func:`build_from_unstructured_module`), the
:class:`DagModule` and its vertices, the op modules, FLOPs counting and source-free saving.
Pruning algorithms live in :mod:`dagprune_algorithms`.

Its modules import each other in one direction (``tests/test_import_graph.py`` checks it): the
registries of :mod:`dagprune.leaf_modules` sit below tracing and saving; support for optional
libraries (:mod:`dagprune.timm_layers`) registers there and is loaded on demand by
:mod:`dagprune.integrations`; and :mod:`dagprune.dag_module` does not import :mod:`dagprune.io`,
which registers the function behind :meth:`DagModule.save` instead.
"""

from dagprune import errors, ops
from dagprune.checkpoints import load_weights, read_state_dict
from dagprune.compare import compare_module_outputs, max_relative_difference
from dagprune.dag_module import DagModule, InnerVertex, InputVertex, Vertex
from dagprune.flops import FlopsReport, count_flops
from dagprune.folding import fold_batch_norms
from dagprune.io import load_dag, load_dag_from_path, save_dag
from dagprune.leaf_modules import register_leaf_module, register_module_rewrite
from dagprune.module_serialization import register_module_serializer
from dagprune.shape_prop import propagate_shapes
from dagprune.tracing import build_from_unstructured_module
from dagprune.training_mode import evaluation_mode

__version__ = "0.1.0"

__all__ = [
    "DagModule", "Vertex", "InputVertex", "InnerVertex", "build_from_unstructured_module",
    "register_leaf_module", "register_module_rewrite", "register_module_serializer",
    "compare_module_outputs", "max_relative_difference", "save_dag", "load_dag",
    "load_dag_from_path", "errors", "ops", "count_flops", "FlopsReport", "fold_batch_norms",
    "propagate_shapes", "evaluation_mode", "load_weights", "read_state_dict",
]
