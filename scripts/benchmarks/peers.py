"""Runs the peers' benchmark scripts (``scripts/peers/*_bench.py``) in their own environments.

A peer that cannot be installed or whose script fails yields ``{"error": ...}`` for its
section instead of stopping the benchmark; the report shows the error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS / "peers"))

from environments import PeerEnvironmentError, ensure_peer_environment  # noqa: E402

PEER_SCRIPTS = {"torch-dag": SCRIPTS / "peers" / "torch_dag_bench.py",
                "torch-pruning": SCRIPTS / "peers" / "torch_pruning_bench.py"}
PEER_NAMES = {"torch-dag": "torch-dag", "torch-pruning": "Torch-Pruning"}


def run_peer(peer: str, section: str, arguments: list[str], timeout_s: float) -> dict:
    """Runs one section of a peer's script; returns its JSON or ``{"error": ...}``."""
    try:
        python = ensure_peer_environment(peer)
    except PeerEnvironmentError as error:
        return {"tool": PEER_NAMES[peer], "error": str(error)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [str(python), str(PEER_SCRIPTS[peer]), "--section", section, "--out", str(out),
                   *arguments]
        environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                      env=environment)
        except subprocess.TimeoutExpired:
            return {"tool": PEER_NAMES[peer], "error": f"{section}: over {timeout_s:.0f} s"}
        if finished.returncode or not out.exists():
            tail = (finished.stderr or finished.stdout).strip().splitlines()[-3:]
            return {"tool": PEER_NAMES[peer],
                    "error": f"{section}: exit {finished.returncode}: {' | '.join(tail)}"}
        result = json.loads(out.read_text())
    result["command"] = " ".join([f"build/peers/{peer}/bin/python",
                                  str(PEER_SCRIPTS[peer].relative_to(SCRIPTS.parent)), "--section",
                                  section, *arguments])
    return result
