"""Running Pythia generator tasks as Ray tasks, with a driver-side progress bar over accepted jets.

The task itself (``qgdist.generate.pythia.generate_task``) is passed in, so this module imports nothing of
``pythia``: ``pythia`` imports this one, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable

from qgdist.generate.mc_settings import PythiaConfig

#: ``(cfg, task_index, n_jets, progress)`` -> the task's record; ``progress(n)`` is told of every accepted jet.
TaskFn = Callable[[PythiaConfig, int, int, Callable[[int], None]], dict]


class _Counter:
    """A zero-CPU actor the tasks tell about every accepted jet, so the driver's bar moves within a task."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n

    def get(self) -> int:
        return self.total


def _task(task_fn: TaskFn, cfg: PythiaConfig, task_index: int, n_jets: int, counter) -> dict:
    return task_fn(cfg, task_index, n_jets, lambda n: counter.add.remote(n) if n else None)


def run_tasks_on_ray(cfg: PythiaConfig, tasks: list[tuple[int, int]], bar, task_fn: TaskFn) -> dict[int, dict]:
    """Run ``task_fn`` for each ``(task_index, n_jets)``, at most ``cfg.workers`` at once; returns the records by
    index. A module-level ``task_fn`` travels to the workers by reference (cloudpickle), not by value.

    Starts a private local Ray with ``cfg.workers`` CPUs (or joins ``cfg.address``) and shuts it down afterwards
    if this call started it.
    """
    import ray

    from qgdist.core.ray import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(cfg.address, None if cfg.address else cfg.workers, dashboard=False)
    try:
        counter = ray.remote(num_cpus=0)(_Counter).remote()
        remote = ray.remote(num_cpus=1, max_retries=2)(_task)
        pending, queue, records, done_jets = {}, list(tasks), {}, 0
        shown = bar.n
        while queue or pending:
            while queue and len(pending) < cfg.workers:
                index, n = queue.pop(0)
                pending[remote.remote(task_fn, cfg, index, n, counter)] = index
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                record = ray.get(ref)  # re-raises a task's error with its traceback
                records[pending.pop(ref)] = record
                done_jets += record["jets"]
            # A retried task reports its jets twice; the finished tasks' totals are exact, so never show less.
            live = ray.get(counter.get.remote())
            target = shown + max(min(live, sum(n for _, n in tasks)), done_jets)
            if target > bar.n:
                bar.update(target - bar.n)
        return records
    finally:
        if started:
            ray.shutdown()
