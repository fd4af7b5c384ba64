"""The maintainers' scripts under ``scripts/`` that tests import, each loaded once."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(relative_path: str):
    """The module of ``scripts/<relative_path>`` (loaded on the first call, then reused)."""
    name = "dagprune_script_" + relative_path.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
