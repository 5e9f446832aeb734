"""Shared fixtures."""

import os
import tempfile

import pytest
import torch

# Every Ray a test starts in this process runs without token authentication. Ray fixes a process's auth mode at
# its first ray.init, so one file's private token-mode Ray (qgdist.core.ray's default) would leave the process
# unable to serve objects to the auth-disabled multi-node clusters of a later file (OwnerDiedError: found when
# `pytest -n 2 --dist loadfile` ran tests/infer/test_predict.py before tests/cluster/test_multinode.py in one
# worker). Token authentication itself is tested in fresh processes (tests/core/test_ray.py, the job head of
# tests/cluster/test_job_submission.py).
os.environ["RAY_AUTH_MODE"] = "disabled"

# qgdist's cache (the empty MLflow store every new run directory's store is copied from, qgdist.track.store) lives
# beside the tests' other temporary files, not in the user's ~/.cache; the test processes and their subprocesses
# share it.
os.environ.setdefault("QGDIST_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"qgdist-test-cache-{os.getuid()}"))

# Under pytest-xdist (the CI's `-n 2`) two test processes share the two cores: each computes with one intra-op
# thread, and so do the commands and Ray workers it starts (they inherit OMP_NUM_THREADS), instead of each
# oversubscribing both cores. Measured: tests/train/test_part_columnar.py and test_loop.py beside one busy core took
# 63.9 s with torch's default 2 threads and 49.6 s with 1.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster and immune to oversubscribed CI cores (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_behind():
    """Each test module starts without a Ray instance another module left running (a pipeline's private Ray
    would otherwise keep its resources, and a later module's 2-worker run could wait for CPUs forever)."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2``; ``--dist loadfile --no-loadscope-reorder`` in pyproject.toml) the files with
    the most slow tests go first.

    Each worker takes the next whole file when it is nearly done with its last, in this order. xdist's own order
    (most tests first) put the long one-test files (quickstart, elastic, driver resume) last, and one worker ran
    them alone for the last ~3 minutes; now the quick files fill the gaps at the end. The order within a file is
    kept, and a run without xdist is left as it is.
    """
    if not hasattr(config, "workerinput"):   # set in xdist's workers only, which all sort the same way
        return

    def file(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow: dict[str, int] = {}   # file -> its slow tests, in collection order
    for item in items:
        slow[file(item)] = slow.get(file(item), 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[file(item)])   # stable: ties keep their order, a file's tests stay together
