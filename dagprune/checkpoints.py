"""Trained weights in: reading a checkpoint and loading it into a model, without pickle.

:func:`read_state_dict` reads

* a safetensors file (a flat state dict);
* a torch file, with ``torch.load(weights_only=True)`` (tensors and plain values only, no
  code): a plain state dict, or a dict holding one under ``"state_dict"``, ``"model"`` or
  ``"state_dict_ema"`` (timm's and most training scripts' checkpoints), in that order of
  preference unless ``use_ema``.

Keys saved from a ``DistributedDataParallel`` (``module.``) or ``torch.compile``
(``_orig_mod.``) wrapper lose that prefix. :func:`load_weights` checks the keys and shapes
against the model first and reports every mismatch at once; a directory written by
:func:`dagprune.save_dag` loads as that DAG instead.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from dagprune.errors import CheckpointError
from dagprune.io import load_dag

__all__ = ["read_state_dict", "load_weights", "STATE_DICT_ENTRIES"]

STATE_DICT_ENTRIES = ("state_dict", "model", "state_dict_ema")
"""Keys of a checkpoint dict that hold the state dict, in order of preference."""

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that DDP and torch.compile wrappers add to every key."""

_SHOWN = 5
"""How many keys a mismatch message lists."""

_IGNORED_MISSING = ("num_batches_tracked",)
"""Buffers a checkpoint may lack without harm (older BatchNorm saves have no counter)."""


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as file:
        head = file.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} looks like safetensors but cannot be read ({error}); "
                              "the file is truncated or corrupt: save it again") from error


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")
"""Lines of torch.load's errors that say nothing about the file."""


def _read_torch_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load reports a bad file in many types
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "Unsupported global" in line), None)
        if refused is not None:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses to "
                f"unpickle ({refused.split(' was not an allowed global')[0]}); in a trusted environment "
                "save only its state dict, e.g. torch.save(checkpoint['state_dict'], 'weights.pt'), "
                "or save it as safetensors") from error
        cause = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), "")
        raise CheckpointError(f"checkpoint {path} is neither a safetensors nor a readable torch file "
                              f"({type(error).__name__}: {cause}); check the path, or save the weights "
                              "again with torch.save(model.state_dict(), path)") from error


def _state_dict_of(checkpoint, path: Path, use_ema: bool) -> dict:
    """The state dict a loaded checkpoint holds (see :data:`STATE_DICT_ENTRIES`)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict; "
                              "save model.state_dict()")
    entries = (("state_dict_ema",) if use_ema else ()) + STATE_DICT_ENTRIES
    for entry in entries:
        if isinstance(checkpoint.get(entry), dict):
            checkpoint = checkpoint[entry]
            break
    else:
        if use_ema:
            raise CheckpointError(f"checkpoint {path} has no 'state_dict_ema' entry (keys: "
                                  f"{_listed(list(checkpoint))}); load it without use_ema")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors or not checkpoint:
        what = f"its keys {_listed(not_tensors)} are not tensors" if not_tensors else "it is empty"
        raise CheckpointError(f"checkpoint {path} holds no state dict ({what}); expected a state dict, or a "
                              f"dict with one under {' / '.join(map(repr, STATE_DICT_ENTRIES))}")
    return checkpoint


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if all(isinstance(key, str) and key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a safetensors or torch checkpoint file (see the module docstring).

    Args:
        path: the checkpoint file.
        use_ema: prefer the ``"state_dict_ema"`` entry (timm's EMA weights).

    Raises:
        CheckpointError: the file is missing, corrupt, holds Python objects besides tensors and
            plain values, or holds no state dict.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save({"epoch": 3, "state_dict": {"module.fc.weight": torch.ones(2, 2)}}, f"{d}/c.pt")
    ...     list(read_state_dict(f"{d}/c.pt"))
    ['fc.weight']
    """
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {where}; give a .safetensors or torch file (or, to "
                              "load_weights, a directory saved with dagprune.save_dag)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; the save was interrupted: save the weights again")
    checkpoint = _read_safetensors(path) if _is_safetensors(path) else _read_torch_file(path)
    return _strip_wrapper_prefixes(_state_dict_of(checkpoint, path, use_ema))


def _listed(keys: list) -> str:
    shown = ", ".join(repr(key) for key in keys[:_SHOWN])
    return f"{shown}{f' and {len(keys) - _SHOWN} more' if len(keys) > _SHOWN else ''} ({len(keys)})"


def _mismatches(model: nn.Module, state_dict: dict) -> list[str]:
    """One phrase per kind of mismatch between ``model`` and ``state_dict`` (empty: they fit)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict
               and not key.rsplit(".", 1)[-1] in _IGNORED_MISSING]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [f"{key}: model {tuple(expected[key].shape)}, checkpoint {tuple(value.shape)}"
              for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    found = []
    if missing:
        found.append(f"missing keys {_listed(missing)}")
    if unexpected:
        found.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        found.append(f"shape mismatches {'; '.join(shapes[:_SHOWN])}"
                     f"{f' and {len(shapes) - _SHOWN} more' if len(shapes) > _SHOWN else ''} ({len(shapes)})")
    hint = _prefix_hint(missing, unexpected)
    return found + ([hint] if hint else [])


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A hint when the checkpoint's keys are the model's under an extra prefix (``backbone.``)."""
    if not missing or not unexpected:
        return ""
    prefix = unexpected[0][:len(unexpected[0]) - len(missing[0])] if unexpected[0].endswith(missing[0]) else ""
    if prefix and all(f"{prefix}{key}" in unexpected for key in missing):
        return f"the checkpoint's keys carry the prefix {prefix!r}: strip it from its keys"
    return ""


def load_weights(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> nn.Module:
    """Loads trained weights into ``model``, before it is converted; or a saved DAG as is.

    Args:
        model: the freshly built model (e.g. ``timm.create_model(name, num_classes=...)``).
        path: a safetensors or torch checkpoint (see :func:`read_state_dict`), or a directory
            saved with :func:`dagprune.save_dag`.
        use_ema: prefer a checkpoint's ``"state_dict_ema"`` entry.

    Returns:
        ``model`` holding the weights (in its own dtype and device), or, for a saved DAG
        directory, that :class:`~dagprune.DagModule` (``model`` is then not used).

    Raises:
        CheckpointError: the file cannot be read (see :func:`read_state_dict`), or its keys
            or shapes do not fit ``model``: the message lists the missing and unexpected keys
            (the first few and their count) and each shape mismatch, and what to check.
        SerializationError: the directory is not a readable saved DAG.

    >>> import tempfile
    >>> model = nn.Sequential(nn.Linear(2, 3))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save({"model": nn.Sequential(nn.Linear(2, 3)).state_dict()}, f"{d}/w.pt")
    ...     load_weights(model, f"{d}/w.pt") is model
    True
    >>> with tempfile.TemporaryDirectory() as d:  # doctest: +ELLIPSIS
    ...     torch.save({"0.weight": torch.ones(4, 2)}, f"{d}/w.pt")
    ...     load_weights(model, f"{d}/w.pt")
    Traceback (most recent call last):
    ...
    dagprune.errors.CheckpointError: checkpoint .../w.pt does not fit Sequential: missing keys '0.bias' (1); shape mismatches 0.weight: ...(4, 2) (1); ...
    """
    if Path(path).is_dir():
        return load_dag(path)
    state_dict = read_state_dict(path, use_ema)
    problems = _mismatches(model, state_dict)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}; check that it "
            "was saved from the same architecture with the same settings (number of classes, input "
            "channels), e.g. timm.create_model(name, num_classes=N)")
    model.load_state_dict(state_dict, strict=False)
    return model
