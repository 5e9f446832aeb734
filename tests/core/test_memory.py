"""``qgdist.core.memory``: handing freed heap back to the system from loops over batches."""

from __future__ import annotations

from qgdist.core import memory


def test_loops_trim_the_heap_once_every_so_many_batches(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1))
    for batches in range(1, 121):
        memory.trim_every(batches)
    assert len(calls) == 120 // memory.TRIM_EVERY
    calls.clear()
    for batches in range(1, 8):
        memory.trim_every(batches, every=3)
    assert len(calls) == 2
