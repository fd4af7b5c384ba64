"""Dict-like model outputs: what a DAG returns for a model that returns a ``ModelOutput``.

Hugging Face models return a ``ModelOutput``: a dict of the fields that are set, also read as
attributes (``out.logits``) and by position (``out[0]``). A DAG converted from such a model
returns the same class while that class is at hand; a DAG loaded from disk (which never imports
the model's library) returns a :class:`DagOutput`, which reads the same way and remembers the
original class's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["DagOutput", "OutputRecord"]


class DagOutput(dict):
    """A dict whose keys are also attributes and whose values are also read by position.

    >>> out = DagOutput({"logits": 1, "loss": 2}, type_name="CausalLMOutput")
    >>> out.logits, out["loss"], out[0], out.to_tuple()
    (1, 2, 1, (1, 2))
    """

    def __init__(self, fields: dict, type_name: str = "DagOutput"):
        super().__init__(fields)
        self.__dict__["type_name"] = type_name

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self.type_name} has no field {name!r}; its fields: {list(self)}") from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        """The values in field order."""
        return tuple(self.values())

    def __repr__(self) -> str:
        return f"{self.type_name}({', '.join(f'{k}=...' for k in self)})"


@dataclasses.dataclass(frozen=True)
class OutputRecord:
    """An output template entry: ``fields`` (a dict template) returned as an instance of a dict
    subclass named ``type_name`` (its qualified name, without its module: a saved DAG names no
    library it would have to import): ``output_class(**fields)`` when the class is known (after
    conversion), a :class:`DagOutput` otherwise (after loading)."""

    type_name: str
    fields: dict
    output_class: type | None = dataclasses.field(default=None, compare=False)

    def build(self, fields: dict) -> Any:
        """The output object holding ``fields`` (the filled template)."""
        if self.output_class is not None:
            return self.output_class(**fields)
        return DagOutput(fields, self.type_name)

