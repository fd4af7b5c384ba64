"""`build_from_unstructured_module` tells what to pass instead of a wrapped, compiled or scripted
model, or of something that is not a module."""

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import ConversionError


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group, as ``torchrun --nproc_per_node 1`` would start."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap, advice", [
    (nn.DataParallel, r"in DataParallel.*unwrap with \.module: build_from_unstructured_module\(model\.module\)"),
    (torch.compile, r"torch\.compile.*pass the original module: build_from_unstructured_module\(model\._orig_mod\)"),
    (torch.jit.script, r"TorchScript module \(RecursiveScriptModule\).*pass the eager nn\.Module"),
    (lambda model: torch.jit.trace(model, torch.zeros(1, 3, 5, 5)), r"TorchScript module.*pass the eager nn\.Module"),
    (lambda model: model.forward, r"needs an nn\.Module, got method"),
])
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_wrapped_compiled_and_scripted_models_get_the_fix(wrap, advice):
    wrapped = wrap(small_model())
    with pytest.raises(ConversionError, match=advice):
        dagprune.build_from_unstructured_module(wrapped)


def test_a_ddp_model_gets_the_fix(single_process_group):
    wrapped = nn.parallel.DistributedDataParallel(small_model())
    with pytest.raises(ConversionError, match=r"wrapped in DistributedDataParallel.*unwrap with \.module"):
        dagprune.build_from_unstructured_module(wrapped)
    assert len(dagprune.build_from_unstructured_module(wrapped.module).inner_vertices) == 2


def test_the_unwrapped_modules_convert():
    model = small_model()
    for unwrapped in (nn.DataParallel(model).module, torch.compile(model)._orig_mod):
        dag = dagprune.build_from_unstructured_module(unwrapped)
        x = torch.randn(1, 3, 5, 5)
        assert torch.equal(dag(x), model(x))

