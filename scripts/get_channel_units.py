#!/usr/bin/env python
"""Print a model's channel units as JSON (mmrazor's ``tools/get_channel_units.py``, same flags).

    python scripts/get_channel_units.py resnet34 --choice
    python scripts/get_channel_units.py resnet34 -i -c -o resnet34_units.json

Same as ``dagprune units``; see ``python scripts/get_channel_units.py -h``. Exit code 0 on
success, 2 on an error (printed as one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from dagprune.errors import DagpruneError
    from dagprune_algorithms.app.units_command import add_units_arguments, run_units

    parser = argparse.ArgumentParser(prog="get_channel_units.py",
                                     description="Get the channel units of a model.")
    add_units_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_units(args)
    except DagpruneError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
