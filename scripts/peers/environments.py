"""Virtual environments for the tools dagprune is benchmarked against (never vendored).

Each peer gets its own environment under ``build/peers/<name>``. Only the peer's own packages
are installed there (``--no-deps``: torch-dag pins torch<=2.1.2 and numpy 1.26.3, which no
longer install next to a current torch); a ``.pth`` file appended to its ``site-packages``
then makes the running interpreter's packages (torch, numpy, fvcore, dagprune...) importable
behind the peer's own, so that a peer's pinned timm wins over ours while every tool runs on
the same torch build, which keeps timings comparable.

    python scripts/peers/environments.py torch-dag      # prints the environment's python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_ROOT = REPO_ROOT / "build" / "peers"

PEER_PACKAGES = {
    # timm 0.9.12 is the newest timm torch-dag accepts; its import of torchvision is optional
    "torch-dag": ["torch-dag==0.1.3", "timm==0.9.12", "click", "graphviz", "pyyaml"],
    "torch-pruning": ["torch-pruning==1.6.1"],
}
"""Pinned packages per peer, installed with ``--no-deps``."""

BASE_PTH = "zz_dagprune_base_env.pth"
STAMP = "dagprune-peer.json"


class PeerEnvironmentError(RuntimeError):
    """A peer environment could not be created or installed."""


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.check_output([str(python), "-c", code], text=True).strip())


def ensure_peer_environment(name: str, quiet: bool = True) -> Path:
    """Creates (once) the environment of peer ``name`` and returns its python executable.

    The environment is reused while its recorded package list and base environment match;
    a failed installation leaves no stamp, so the next call installs again.
    """
    if name not in PEER_PACKAGES:
        raise PeerEnvironmentError(f"unknown peer {name!r}; known: {sorted(PEER_PACKAGES)}")
    root = PEERS_ROOT / name
    python = root / "bin" / "python"
    wanted = {"packages": PEER_PACKAGES[name], "base": sysconfig.get_paths()["purelib"],
              "python": sys.version.split()[0]}
    stamp = root / STAMP
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    stamp.unlink(missing_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    command = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               *(["-q"] if quiet else []), *PEER_PACKAGES[name]]
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode:
        raise PeerEnvironmentError(f"installing {name} into {root} failed (exit {result.returncode}): "
                                   f"{(result.stderr or '')[-2000:]}")
    (_site_packages(python) / BASE_PTH).write_text(wanted["base"] + "\n")
    stamp.write_text(json.dumps(wanted))
    return python


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peers", nargs="+", choices=sorted(PEER_PACKAGES))
    args = parser.parse_args(argv)
    for name in args.peers:
        print(ensure_peer_environment(name, quiet=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
