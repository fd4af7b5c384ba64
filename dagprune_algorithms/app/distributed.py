"""Several processes: ``dagprune prune`` under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N dagprune prune ...`` starts N processes that each set
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`process_group` reads them, joins the
processes into one group (gloo on CPU, NCCL on CUDA, where process ``LOCAL_RANK`` of a
machine uses ``cuda:LOCAL_RANK``) and hands back a :class:`Ranks`: who this process is, and the
few collective operations the jobs need. Everything a process decides from its own data
(a loss that became NaN, Taylor importance scores, validation counts) goes through them, so
every process takes the same decision; only rank 0 writes files.

With ``--fsdp`` the gated model of the pruning phase is sharded instead
(:func:`shard_gated_model`, FSDP2's ``fully_shard``): each process holds a shard of every
weight, its gradient and its Adam moments, and gathers a vertex's weights only while that vertex
runs. The gates stay whole on every process (their gradients averaged by
:meth:`Ranks.average_gradients`), so the pruning losses read full logits. Checkpoints hold
gathered, unsharded tensors (:func:`gathered_state`), in the format of an unsharded run.

>>> ranks = Ranks()  # a run in one process: every operation returns its input
>>> ranks.is_main, ranks.sum(3), ranks.gather("state")
(True, 3, ['state'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dagprune.training_mode import evaluation_mode

from dagprune_algorithms.app.errors import ProcessGroupError

__all__ = ["Ranks", "SINGLE_PROCESS", "add_distributed_arguments", "launched_by_torchrun", "process_group",
           "shard_gated_model", "is_sharded", "unsharded_parameters", "no_gradient_sync", "gathered_state",
           "load_gathered_state"]

LOG = logging.getLogger("dagprune.distributed")

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""The environment variables ``torchrun`` sets in every process it starts."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process among the processes of a run, and the collective operations they share.

    Every method is a collective when :attr:`distributed` (every process must call it, in the
    same order) and returns its input unchanged in a single process.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` numbers the processes.
        device: where this process computes (and where NCCL wants the collectives' tensors).
        distributed: whether a process group joins this process to others.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files, logs and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Waits until every process gets here (e.g. until rank 0 has written a file)."""
        if self.distributed:
            dist.barrier()

    def wrap(self, model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
        """``model`` in a DistributedDataParallel (which averages the gradients of every
        backward pass over the processes and starts from rank 0's parameters and buffers), or
        ``model`` itself in a single process.

        DistributedDataParallel fails at the second step when a trainable parameter got no
        gradient in the first (a branch the forward pass does not use), unless told to look
        for such parameters every step, which costs a walk over the autograd graph. So with
        ``example_inputs`` it first runs one forward and backward pass of ``model`` on them
        (:func:`_parameters_without_gradient`) and looks only when one is found, saying which.
        """
        if not self.distributed:
            return model
        unused = [] if example_inputs is None else _parameters_without_gradient(model, example_inputs)
        if unused and self.is_main:
            LOG.info("%d trainable parameter(s) get no gradient (%s%s): DistributedDataParallel looks for "
                     "unused parameters every step", len(unused), ", ".join(unused[:5]),
                     ", ..." if len(unused) > 5 else "")
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=bool(unused))

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Replaces the gradients of ``parameters`` by their mean over the processes (one
        all-reduce; a parameter without gradient counts as zero), as DistributedDataParallel does
        for its parameters: for those that a sharded model leaves whole on every process."""
        if not self.distributed or not parameters:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        joined = self.mean_(torch.cat([parameter.grad.reshape(-1) for parameter in parameters]))
        for parameter, mean in zip(parameters, joined.split([parameter.numel() for parameter in parameters])):
            parameter.grad.copy_(mean.view_as(parameter.grad))

    def sum(self, value: int) -> int:
        """The sum of ``value`` over the processes."""
        if not self.distributed:
            return value
        total = torch.tensor(value, dtype=torch.long, device=self.device)
        dist.all_reduce(total)
        return int(total)

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replaces ``tensor`` in place by its elementwise minimum over the processes."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replaces ``tensor`` in place by its elementwise mean over the processes."""
        if self.distributed:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def gather(self, value) -> list:
        """``[value of rank 0, value of rank 1, ...]`` on every process (picklable values)."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copies rank 0's buffers of ``module`` (e.g. BatchNorm statistics, which each process
        updates from its own batches between two forward passes) to every process."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


SINGLE_PROCESS = Ranks()
"""The :class:`Ranks` of a run in one process."""


def add_distributed_arguments(parser) -> None:
    """Declares ``--grad-accum``, ``--distributed`` and ``--fsdp``."""
    group = parser.add_argument_group(
        "several processes and large batches",
        "torchrun --nproc_per_node N --no-python dagprune prune ... trains on N processes (gloo on CPU, "
        "NCCL on GPUs); see resources/pruning_guide.md, 'Several GPUs / processes'")
    group.add_argument("--grad-accum", type=int, default=1, metavar="K",
                       help="gradient accumulation: one optimizer step (what --steps, --baseline-steps, "
                            "--finetune-steps, --checkpoint-every and --step-epoch count) runs K "
                            "micro-batches of --batch-size images per process and averages their "
                            "gradients, so a step sees --batch-size x K x processes images (default 1)")
    group.add_argument("--distributed", action="store_true",
                       help="join the processes of a torchrun launch even when it starts one (with "
                            "several it is automatic): DistributedDataParallel, gloo on --device cpu, "
                            "NCCL on --device cuda (process i of a machine on cuda:i); --batch-size is "
                            "per process, rank 0 alone writes --out, and a rerun resumes only with the "
                            "same number of processes")
    group.add_argument("--fsdp", action="store_true",
                       help="shard the gated model of --method dag over the processes (FSDP2 fully_shard, one "
                            "shard unit per DAG vertex) instead of replicating it: each process holds 1/N of "
                            "the weights, gradients and Adam state; the gates stay whole on every process. "
                            "Implies --distributed; the baseline, fine-tuning and reference phases still use "
                            "DistributedDataParallel; checkpoints hold whole tensors; not with --amp fp16")


def launched_by_torchrun() -> bool:
    """Whether the environment holds the variables ``torchrun`` sets."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@contextlib.contextmanager
def process_group(device_name: str, required: bool = False, option: str = "--distributed") -> Iterator[Ranks]:
    """Joins the processes of a ``torchrun`` launch for the duration of the ``with`` block.

    Outside torchrun, or when it started one process and ``required`` is false, yields a
    single-process :class:`Ranks` on ``device_name``. Otherwise initialises the default process
    group (gloo for ``cpu``, NCCL for ``cuda``) and destroys it when the block ends, also on an
    error.

    Args:
        device_name: ``--device``: ``cpu`` or ``cuda`` (each process then uses
            ``cuda:LOCAL_RANK``).
        required: ``--distributed`` (or ``--fsdp``): join a group even with one process, and
            fail outside torchrun.
        option: the option that made it ``required``, for the error message.

    Raises:
        ProcessGroupError: ``required`` outside torchrun, unreadable torchrun variables, a device
            that cannot be shared out (``cuda:N``, mps, more processes than GPUs) or a missing
            backend.
    """
    ranks = _ranks_from_environment(device_name, required, option)
    if not ranks.distributed:
        yield ranks
        return
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.device)
    backend = _backend(ranks.device)
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ProcessGroupError(f"process {ranks.rank} of {ranks.world_size} cannot join the others over {backend} "
                                f"({type(error).__name__}: {first_line}); start the run with torchrun "
                                "(which sets MASTER_ADDR and MASTER_PORT), or on a free --master_port") from error
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def _ranks_from_environment(device_name: str, required: bool, option: str) -> Ranks:
    """The :class:`Ranks` the torchrun variables describe (a single process outside torchrun)."""
    if not launched_by_torchrun():
        if required:
            raise ProcessGroupError(f"{option}: this process was not started by torchrun (WORLD_SIZE, RANK "
                                    "and LOCAL_RANK are not set); run `torchrun --nproc_per_node N "
                                    f"--no-python dagprune prune ...`, or drop {option}")
        return Ranks(device=torch.device(device_name))
    try:
        world_size, rank, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    except ValueError as error:
        found = ", ".join(f"{name}={os.environ[name]!r}" for name in TORCHRUN_VARIABLES)
        raise ProcessGroupError(f"the torchrun variables must be integers, got {found}; start the run with "
                                "torchrun") from error
    if world_size == 1 and not required:
        return Ranks(device=torch.device(device_name))
    return Ranks(rank, world_size, local_rank, _process_device(device_name, local_rank, world_size), True)


def _process_device(device_name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of process ``local_rank``: ``cpu``, or ``cuda:local_rank``."""
    device = torch.device(device_name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ProcessGroupError(f"--device {device_name}: several processes train on cpu (gloo) or cuda "
                                "(NCCL); choose one of them")
    if device.index is not None and world_size > 1:
        raise ProcessGroupError(f"--device {device_name}: under torchrun each process uses cuda:LOCAL_RANK; "
                                "give --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ProcessGroupError(f"process LOCAL_RANK={local_rank} has no GPU: this machine has {count}; "
                                f"start at most {count} processes per machine (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def _backend(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors."""
    backend, available = ("nccl", dist.is_nccl_available()) if device.type == "cuda" else \
        ("gloo", dist.is_gloo_available())
    if not (dist.is_available() and available):
        raise ProcessGroupError(f"this PyTorch build has no {backend} backend for --device {device.type}; "
                                "install a build with torch.distributed support")
    return backend


def shard_gated_model(gated: nn.Module, gates: list[nn.Parameter], ranks: Ranks) -> nn.Module:
    """Shards ``gated`` (a DagModule) over the processes in place, with FSDP2's ``fully_shard``:
    one unit per vertex module that holds parameters, then the DAG itself as the root, which
    leaves the ``gates`` whole on every process. Returns ``gated``.

    One unit per vertex: a vertex's weights are gathered just before it runs and freed right
    after (the root alone would gather the whole model), and a gated op reads its layer's
    weight inside its own forward, so its unit must be the vertex module, not the layer. The
    gates stay whole because the FLOPs and entropy losses read every logit outside the forward
    pass, and every process must take the same keep decisions: their gradients are averaged
    by :meth:`Ranks.average_gradients` instead (a gate costs one float per channel).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    gate_ids = {id(gate) for gate in gates}
    units = {id(vertex.module): vertex.module for vertex in gated.inner_vertices
             if any(id(p) not in gate_ids for p in vertex.module.parameters())}
    for unit in units.values():
        fully_shard(unit, mesh=mesh)
    fully_shard(gated, mesh=mesh, ignored_params=set(gates))
    return gated


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` was sharded by ``fully_shard`` (no FSDP module exists before FSDP is
    imported, so a run without ``--fsdp`` never imports it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def unsharded_parameters(model: nn.Module | None) -> list[nn.Parameter]:
    """The trainable parameters that a sharded ``model`` holds whole on every process (its
    ignored parameters: the gates); none for any other model."""
    if not is_sharded(model):
        return []
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module | None) -> Iterator[None]:
    """Skips the gradient reduction of the backward passes in the block: ``no_sync()`` of a
    DistributedDataParallel, ``set_requires_gradient_sync(False)`` of a sharded model."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def gathered_state(state):
    """``state`` (a model's or an optimizer's state dict) with every sharded tensor gathered
    whole, on the CPU: the state an unsharded run would have, loadable without FSDP. A
    collective when ``state`` holds sharded tensors (every process must call it, and gets it)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:  # nothing was sharded: the state as it is
        return state
    if isinstance(state, dtensor.DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {key: gathered_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gathered_state(value) for value in state)
    return state


def load_gathered_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                        optimizer_state: dict | None) -> None:
    """Loads the whole tensors of a :func:`gathered_state` (or of an unsharded run) into
    ``model`` and ``optimizer``, each process keeping its shard of what the model shards."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    current = model.state_dict()
    model.load_state_dict({name: _shard_like(value, current.get(name)) for name, value in model_state.items()})
    if optimizer is not None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        state = {index: {name: _shard_like(value, parameters[int(index)]) for name, value in entry.items()}
                 for index, entry in optimizer_state["state"].items()}
        optimizer.load_state_dict({**optimizer_state, "state": state})


def _shard_like(value, like):
    """``value`` sharded as ``like`` is, where ``like`` is a sharded tensor of its shape;
    ``value`` itself otherwise (e.g. Adam's step count). Every process holds ``value`` whole
    (it read the checkpoint), so each keeps its shard without communicating."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not (isinstance(like, DTensor) and isinstance(value, torch.Tensor) and value.shape == like.shape):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _parameters_without_gradient(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the trainable parameters of ``model`` that a training-mode forward and backward
    pass on ``example_inputs`` leaves without a gradient. The model's gradients, buffers (batch
    norm statistics), training mode and the random state are as before."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gradients = [p.grad for _, p in trainable]
    buffers = [buffer.clone() for buffer in model.buffers()]
    devices = [example_inputs.device] if example_inputs.device.type == "cuda" else []
    try:
        for _, parameter in trainable:
            parameter.grad = None
        with torch.random.fork_rng(devices=devices), evaluation_mode(model):  # restores each module's mode
            model.train()
            outputs = _floating_tensors(model(example_inputs))
            if not outputs:  # nothing to differentiate: nothing to tell
                return []
            torch.stack([output.float().sum() for output in outputs]).sum().backward()
        return [name for name, parameter in trainable if parameter.grad is None]
    finally:
        for (_, parameter), gradient in zip(trainable, gradients):
            parameter.grad = gradient
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)


def _floating_tensors(outputs) -> list[torch.Tensor]:
    """The floating-point tensors of a model's outputs (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() and outputs.requires_grad else []
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else ()
    return [tensor for value in values for tensor in _floating_tensors(value)]
