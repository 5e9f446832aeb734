"""Shared fixtures."""

import pytest
import torch


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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n 2 --dist loadgroup`` (pytest-xdist) each test file runs whole in one worker, so its
    module-scoped fixtures (a Ray instance, a trained model) are built once; files that name an ``xdist_group``
    share one worker. Without xdist the marker does nothing."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
