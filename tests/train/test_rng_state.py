"""A rank's random state survives the checkpoint: saved with plain ``torch.save`` and read back with
``weights_only=True``, it makes python, numpy (the cached Gaussian included) and torch draw exactly what they would
have drawn without the interruption; tensors of the training state come back on the CPU in the same containers."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from qgdist.train.checkpoint import rng_state, set_rng_state, to_cpu


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.standard_normal(), np.random.random(),
            torch.rand(4).tolist(), torch.randn(2).tolist())


def test_a_restored_rng_state_replays_every_generator_after_a_weights_only_round_trip() -> None:
    np.random.standard_normal()   # leaves the second Gaussian of a pair cached in numpy's state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = _draws()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert _draws() != expected
    set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert _draws() == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA state is restored, as it should be")
def test_a_gpu_runs_rng_state_resumes_on_a_cpu_only_machine() -> None:
    """A checkpoint written on a GPU (its CUDA state, or the list of every GPU's of older checkpoints) restores
    the CPU generators where no GPU is visible; the CUDA part is left alone there."""
    for cuda in (torch.zeros(16, dtype=torch.uint8), [torch.zeros(16, dtype=torch.uint8)]):
        state = rng_state() | {"cuda": cuda}
        expected = _draws()
        set_rng_state(state)
        assert _draws() == expected


def test_training_state_comes_to_the_cpu_detached_in_the_same_containers() -> None:
    weight = torch.ones(3, requires_grad=True) * 2
    moved = to_cpu({"a": [weight, (weight, 5)], "b": "text", "c": {"d": weight}})
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 5
    assert moved["b"] == "text" and torch.equal(moved["c"]["d"], weight.detach())
    for tensor in (moved["a"][0], moved["a"][1][0], moved["c"]["d"]):
        assert tensor.device.type == "cpu" and not tensor.requires_grad
