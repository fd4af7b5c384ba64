"""Exceptions raised by the ``dagprune`` command and its jobs (not by the library)."""

from dagprune.errors import DagpruneError

__all__ = ["DataError"]


class DataError(DagpruneError, ValueError):
    """A data set could not be found or read."""
