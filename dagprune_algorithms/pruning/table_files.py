"""Measured tables kept on disk as JSON: filed under a hash of what decides them, written
atomically, read back with their format checked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import ClassVar

from dagprune.errors import PruningError

__all__ = ["CachedTable", "cache_key"]

LOG = logging.getLogger(__name__)


def cache_key(description: dict) -> str:
    """A short hash of ``description`` (what decides a table), for its file name."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


class CachedTable:
    """Base of the measured tables (dataclasses with ``path`` and ``from_cache`` fields): their
    JSON form, an atomic :meth:`save` and a checked :meth:`load`."""

    FORMAT: ClassVar[int] = 1
    """Version of the files; a file of another version is not read."""
    KIND: ClassVar[str] = "table"
    """What the errors call the table."""

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.pop("path"), fields.pop("from_cache")
        return {"format": self.FORMAT, **fields}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the table as JSON (atomically: a reader sees the old file or the new one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(temporary, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Reads a table written by :meth:`save`.

        Raises:
            PruningError: the file is not a table of this kind and version.
        """
        path = Path(path)
        try:
            fields = json.loads(path.read_text())
            if fields.pop("format") != cls.FORMAT:
                raise ValueError(f"format is not {cls.FORMAT}")
            table = cls(**fields, path=path, from_cache=True)
            table.check_contents()
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise PruningError(f"{path} is not a dagprune {cls.KIND} ({error}); delete it to measure "
                               "the table again") from error
        return table

    @classmethod
    def read_cached(cls, path: Path):
        """The table in ``path``; None when there is none, or (with a warning) when the file is
        not a usable table, so that the caller measures it again."""
        if not path.is_file():
            return None
        try:
            return cls.load(path)
        except PruningError as error:
            LOG.warning("%s; measuring it again", error)
            return None

    def check_contents(self) -> None:
        """Raises ValueError where the fields read are not a usable table."""
