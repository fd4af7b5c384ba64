"""Exceptions raised by dagprune.

Every failure a user can reach raises a subclass of :class:`DagpruneError`, with a message that
says what went wrong, where (vertex, module path, source line when known) and what to do next.
"""

__all__ = [
    "DagpruneError",
    "ConversionError",
    "DagLintError",
    "SerializationError",
    "CheckpointError",
    "UnsupportedOpError",
    "PruningError",
    "ExecutionError",
    "TrainingBranchWarning",
]


class DagpruneError(Exception):
    """Base class of every error raised by dagprune and dagprune_algorithms."""


class ConversionError(DagpruneError):
    """A model could not be converted into a :class:`~dagprune.DagModule`."""


class DagLintError(DagpruneError):
    """A :class:`~dagprune.DagModule` breaks one of its structural invariants."""


class SerializationError(DagpruneError):
    """A DAG could not be saved, or a saved file is corrupt, truncated or foreign."""


class CheckpointError(SerializationError, ValueError):
    """A checkpoint of trained weights cannot be read, or does not fit the model."""


class UnsupportedOpError(DagpruneError):
    """An operation has no registered handler for the requested pass."""


class PruningError(DagpruneError):
    """Channel pruning cannot proceed with the given model or arguments."""


class ExecutionError(DagpruneError):
    """A DAG failed while running on example inputs (a wrong input shape, dtype or count)."""


class TrainingBranchWarning(UserWarning):
    """A converted module runs other ops in train mode than in eval mode, and the DAG follows
    its eval branch in both (see :func:`dagprune.build_from_unstructured_module`)."""
