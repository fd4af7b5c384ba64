"""Several processes: ``dagprune prune`` under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N dagprune prune ...`` starts N processes that each set
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`process_group` reads them, joins the
processes into one group (gloo on CPU, NCCL on CUDA, where process ``LOCAL_RANK`` of a
machine uses ``cuda:LOCAL_RANK``) and hands back a :class:`Ranks`: who this process is, and the
few collective operations the jobs need. Everything a process decides from its own data
(a loss that became NaN, Taylor importance scores, validation counts) goes through them, so
every process takes the same decision; only rank 0 writes files.

>>> ranks = Ranks()  # a run in one process: every operation returns its input
>>> ranks.is_main, ranks.sum(3), ranks.gather("state")
(True, 3, ['state'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dagprune_algorithms.app.errors import ProcessGroupError

__all__ = ["Ranks", "SINGLE_PROCESS", "add_distributed_arguments", "launched_by_torchrun", "process_group"]

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

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in a DistributedDataParallel (which averages the gradients of every
        backward pass over the processes and starts from rank 0's parameters and buffers), or
        ``model`` itself in a single process."""
        if not self.distributed:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

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
    """Declares ``--grad-accum`` and ``--distributed``."""
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


def launched_by_torchrun() -> bool:
    """Whether the environment holds the variables ``torchrun`` sets."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@contextlib.contextmanager
def process_group(device_name: str, required: bool = False) -> Iterator[Ranks]:
    """Joins the processes of a ``torchrun`` launch for the duration of the ``with`` block.

    Outside torchrun, or when it started one process and ``required`` is false, yields a
    single-process :class:`Ranks` on ``device_name``. Otherwise initialises the default process
    group (gloo for ``cpu``, NCCL for ``cuda``) and destroys it when the block ends, also on an
    error.

    Args:
        device_name: ``--device``: ``cpu`` or ``cuda`` (each process then uses
            ``cuda:LOCAL_RANK``).
        required: ``--distributed``: join a group even with one process, and fail outside
            torchrun.

    Raises:
        ProcessGroupError: ``required`` outside torchrun, unreadable torchrun variables, a device
            that cannot be shared out (``cuda:N``, mps, more processes than GPUs) or a missing
            backend.
    """
    ranks = _ranks_from_environment(device_name, required)
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


def _ranks_from_environment(device_name: str, required: bool) -> Ranks:
    """The :class:`Ranks` the torchrun variables describe (a single process outside torchrun)."""
    if not launched_by_torchrun():
        if required:
            raise ProcessGroupError("--distributed: this process was not started by torchrun (WORLD_SIZE, RANK "
                                    "and LOCAL_RANK are not set); run `torchrun --nproc_per_node N "
                                    "--no-python dagprune prune ...`, or drop --distributed")
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
