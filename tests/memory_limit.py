"""A cap on how much more memory the test process may allocate, for tests of bounded loading.

Inside :func:`allocation_limit` an allocation that would take the process's data segment more
than ``extra_bytes`` past its size on entry fails at once (torch raises ``RuntimeError: ...
can't allocate memory``, Python ``MemoryError``) instead of swapping or being killed. It uses
``RLIMIT_DATA``, which Linux applies to heap and anonymous mappings; elsewhere the block runs
without a cap and :data:`LIMIT_ENFORCED` is False.
"""

from __future__ import annotations

import contextlib
import re
import sys

LIMIT_ENFORCED = sys.platform.startswith("linux")
ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory", "out of memory")


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmData:\s+(\d+) kB", status.read()).group(1)) * 1024


@contextlib.contextmanager
def allocation_limit(extra_bytes: int):
    """Fails allocations beyond ``extra_bytes`` more than the process holds now, in the block."""
    if not LIMIT_ENFORCED:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _data_segment_bytes() + extra_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY
                                              else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is an allocation hitting the cap."""
    while error is not None:
        if isinstance(error, MemoryError) or any(text in str(error)
                                                 for text in ALLOCATION_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False
