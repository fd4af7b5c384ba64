"""Functions a DAG may name: tensor computations and what op specs declare, nothing else."""

from __future__ import annotations

import builtins
import math
import operator

import pytest
import torch
from torch import nn

from dagprune.errors import ConversionError, SerializationError
from dagprune.ops import OP_TYPES, OpRegistry, OpSpec, opaque_coupling, resolve_function
from dagprune.ops.functions import function_name, method_name

# Names of torch's namespaces that exist but change global state, touch files or processes,
# or run code they are given: a file naming one must be refused.
REFUSED = [
    "torch.load", "torch.save", "torch.manual_seed", "torch.set_default_dtype",
    "torch.set_num_threads", "torch.use_deterministic_algorithms", "torch.fork", "torch.compile",
    "torch.from_numpy", "torch.set_printoptions", "torch.set_grad_enabled", "torch.hub.load",
    "torch.jit.script", "torch.cuda.synchronize", "torch.autograd.backward",
    "Tensor.register_hook", "Tensor.backward", "Tensor.tolist", "Tensor.numpy", "Tensor.storage",
    "Tensor.data_ptr", "Tensor.share_memory_", "Tensor._make_subclass", "os.system",
    "builtins.eval", "operator.attrgetter", "operator.methodcaller",
]


@pytest.mark.parametrize("name", REFUSED)
def test_functions_outside_the_allowlist_are_refused(name):
    with pytest.raises(SerializationError, match="unknown|forbidden"):
        resolve_function(name)


def test_tensor_methods_outside_the_allowlist_cannot_be_traced():
    with pytest.raises(ConversionError):
        method_name("register_hook")
    with pytest.raises(ConversionError):
        function_name(torch.manual_seed)


def test_every_function_an_op_family_declares_resolves():
    for cls in OP_TYPES.values():
        for name in getattr(cls, "function_names", ()):
            if name.startswith("getattr.") or not _exists(name):  # getattr.T reads an attribute
                continue
            assert callable(resolve_function(name)), name


def _exists(name: str) -> bool:
    """Whether ``name`` names something in the installed torch (families list the same short
    name in several namespaces, not all of which have it)."""
    roots = {"torch": torch, "Tensor": torch.Tensor, "operator": operator, "math": math}
    root, _, path = name.partition(".")
    value = roots.get(root, builtins)
    for part in path.split(".") if path else [root]:
        value = getattr(value, part, None)
    return callable(value) and not isinstance(value, type)


@pytest.mark.parametrize("name", ["torch.cat", "torch.zeros", "torch.arange", "torch.relu_",
                                  "torch.nn.functional.scaled_dot_product_attention",
                                  "torch.nn.functional.rms_norm", "torch.linalg.vector_norm",
                                  "Tensor.view", "Tensor.new_zeros", "Tensor.__getitem__",
                                  "operator.add", "operator.getitem", "math.sqrt", "getattr"])
def test_tensor_computations_resolve(name):
    assert callable(resolve_function(name))


def test_a_spec_declaring_a_function_allows_it():
    name = "torch.cudnn_is_acceptable"  # exists, but is no tensor computation of the allowlist
    with pytest.raises(SerializationError):
        resolve_function(name)
    OpRegistry().register(OpSpec("cudnn_check", (name,), flops=lambda m, i, o: 0,
                                 coupling=opaque_coupling))
    assert resolve_function(name) is torch.cudnn_is_acceptable


def test_a_spec_naming_a_module_class_declares_no_function():
    OpRegistry().register(OpSpec("tanh_layer", (nn.Tanh,), flops=lambda m, i, o: 0,
                                 coupling=opaque_coupling))
    with pytest.raises(SerializationError):
        resolve_function("torch.nn.Tanh")


def test_a_torch_nn_class_no_spec_declares_is_refused_when_loading(tmp_path):
    import json

    import dagprune
    from dagprune.errors import SerializationError as LoadError

    dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    dag.save(tmp_path / "dag")
    graph_file = tmp_path / "dag" / "graph.json"
    document = json.loads(graph_file.read_text())
    module = document["graph"]["vertices"][1]["module"]
    assert module["type"] == "torch.nn.ReLU"
    module["type"], module["config"] = "torch.nn.CrossEntropyLoss", {"dict": {}}  # exists, no spec
    graph_file.write_text(json.dumps(document))
    with pytest.raises(LoadError, match="CrossEntropyLoss"):
        dagprune.load_dag(tmp_path / "dag")
