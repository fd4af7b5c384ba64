"""Run by test_cli_distributed under torchrun: ``dagprune prune`` in this process, watched.

The command line is the one of ``dagprune prune``. Environment variables add the watching:

* ``DDP_TEST_DUMP``: a directory where this rank writes, when the command returns,
  ``rank<R>.pt``, ``{phase: state dict of the trained model at the end of the phase}`` (the
  phase named by its checkpoint, e.g. ``pruning``: the gated model with its gate logits, gathered
  whole when ``--fsdp`` sharded it (a sharded model's gates are this rank's own tensors); and
  ``prune_at_step_<S>``: the Taylor score sums a ``--method l1`` prune at step S ranked the
  channels by, and the channel masks right after it), and
  ``rank<R>_writes.json``, every file this rank created, renamed or removed under ``--out``
  (seen by a ``sys.addaudithook`` hook: Python's ``open``, ``os.open``, ``os.replace``,
  ``os.mkdir``, ...).
* ``DDP_TEST_KILL_AFTER``: ``FILE:STEP``: the process that writes checkpoint ``FILE`` at ``STEP``
  dies right after (``os._exit``, as if killed); torchrun then stops the others.

The latency measurement is replaced by a constant, so that two runs give identical reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dagprune_algorithms.app import iterative_job, latency, prune_job, training
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.app.distributed import gathered_state
from dagprune_algorithms.pruning.iterative import ItePruneAlgorithm

_WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _record_writes(out: str, writes: list) -> None:
    """Appends ``"event path"`` to ``writes`` for every write under ``out`` (an absolute path)."""
    def hook(event, args):
        if event == "open":
            paths, (mode, flags) = args[:1], args[1:]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        elif event in _WRITE_EVENTS:
            paths, writing = args[:2] if event == "os.rename" else args[:1], True
        else:
            return
        for path in paths if writing else ():
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path == out or path.startswith(out + os.sep):
                    writes.append(f"{event} {path}")
    sys.addaudithook(hook)


def _record_phase_states(states: dict) -> None:
    """Keeps the state of the model each ``train_steps`` call trained, by phase."""
    train_steps = training.train_steps

    def recording(model, *args, **kwargs):
        history = train_steps(model, *args, **kwargs)
        phase = Path(kwargs["checkpoint_path"]).stem
        state = gathered_state(model.state_dict())  # every rank: gathering a sharded model is a collective
        states[phase] = {name: value.detach().cpu().clone() for name, value in state.items()}
        return history

    prune_job.train_steps = recording
    iterative_job.train_steps = recording
    maybe_prune = ItePruneAlgorithm.maybe_prune

    def recording_prunes(algorithm, step):
        scores = algorithm.taylor_scores
        ranked_by = {} if scores is None else {f"taylor.{name}": buffer.detach().cpu().clone()
                                               for name, buffer in scores.named_buffers()}
        pruned = maybe_prune(algorithm, step)
        if pruned:  # before the next forward pass, where DistributedDataParallel copies rank 0's masks
            states[f"prune_at_step_{step}"] = {**ranked_by, **{
                name: buffer.detach().cpu().clone() for name, buffer in algorithm.architecture.named_buffers()
                if name.endswith("mask")}}
        return pruned

    ItePruneAlgorithm.maybe_prune = recording_prunes


def _die_after_writing(file_name: str, step: int) -> None:
    save_checkpoint = training.save_checkpoint

    def write_then_die(path, state):
        save_checkpoint(path, state)
        if Path(path).name == file_name and state.get("step") == step:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(9)

    training.save_checkpoint = write_then_die


def _constant_latency() -> None:
    measured = latency.LatencyResult(median_ms=1.0, iqr_ms=0.0, p25_ms=1.0, p75_ms=1.0, batch_size=32,
                                     num_threads=1, device="cpu", repeats=1)
    latency.measure_latency = lambda *args, **kwargs: measured
    share = latency.LatencyShare(median=1.0, p25=1.0, p75=1.0, rounds=1)
    latency.measure_latency_share = lambda *args, **kwargs: share


def run() -> int:
    argv = sys.argv[1:]
    rank = int(os.environ["RANK"])
    out = os.path.abspath(argv[argv.index("--out") + 1])
    writes: list = []
    states: dict = {}
    _record_writes(out, writes)
    _record_phase_states(states)
    _constant_latency()
    if os.environ.get("DDP_TEST_KILL_AFTER"):
        file_name, step = os.environ["DDP_TEST_KILL_AFTER"].split(":")
        _die_after_writing(file_name, int(step))
    code = main(argv)
    dump = Path(os.environ["DDP_TEST_DUMP"])
    torch.save(states, dump / f"rank{rank}.pt")
    (dump / f"rank{rank}_writes.json").write_text(json.dumps(writes))
    return code


if __name__ == "__main__":
    sys.exit(run())
