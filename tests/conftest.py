"""Shared pytest fixtures."""

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so a failure seen in CI reproduces anywhere.
# Set HYPOTHESIS_PROFILE=explore to draw fresh random examples instead (e.g. in a nightly sweep).
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a test module with one intra-op thread.

    The models in these tests are small: a second thread buys little, while on a busy machine
    (a shared CI runner, other jobs on the same cores) OpenMP threads waiting for each other
    made them much slower (tests/test_conversion, _io, _flops, _cli_convert, _readme: 630 s with
    two threads, 93 s with one, on 2 cores with a load average of 7 to 9). Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (setup.cfg) starts one test worker per core, at most four.

    Each worker imports torch, timm and transformers and builds its own models; more than four
    buy little for this suite and cost a gigabyte or more of memory each.
    """
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_configure(config):
    """Parallel workers share the cores: each gets its share of torch's intra-op threads.

    Several workers each running torch's default thread count (one per core) oversubscribe the
    cores, and OpenMP threads then wait for each other. Processes a test starts inherit the same
    count through ``OMP_NUM_THREADS``, so a child recomputing a parent's output bit for bit (the
    saved-DAG tests) reduces in the same order.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
