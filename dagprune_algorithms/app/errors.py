"""Exceptions raised by the ``dagprune`` command and its jobs (not by the library)."""

from dagprune.errors import DagpruneError

__all__ = ["DataError", "ProcessGroupError"]


class DataError(DagpruneError, ValueError):
    """A data set could not be found or read."""


class ProcessGroupError(DagpruneError):
    """The processes of a ``torchrun`` launch cannot be joined into one run (environment,
    device or backend)."""
