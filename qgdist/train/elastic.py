"""What changes when an elastic run resumes with another number of workers (see docs/training.md, "Elastic runs").

The per-worker batch stays the same, so the global batch follows the world size; the learning rate is not rescaled.
The epoch in progress continues with exactly the jets its earlier layouts had not drawn (``qgdist.data.epoch_plan``)
and later epochs are planned for the new world size. The learning-rate schedule keeps the fraction of it already
done, and stretches or shrinks what is left over the steps that now remain.
"""

from __future__ import annotations

from typing import Any

from qgdist.data.epoch_plan import Layout
from qgdist.data.loader import ShardLoader
from qgdist.train.checkpoint import Checkpoint


def layouts_before(saved: dict[str, Any], step: int, world: int, workers: int) -> tuple[Layout, ...]:
    """The layouts that ran the first ``step`` steps of the resumed epoch, for a loader of ``world`` ranks.

    ``saved`` is a rank's loader state from the checkpoint (``ShardLoader.state_dict``). Empty at an epoch's start;
    the saved layouts when the world is the same; those plus the saved world's own when it changed.
    """
    if step == 0:
        return ()
    earlier = tuple(Layout(**layout) for layout in saved.get("earlier", []))
    if saved["world_size"] == world and saved["num_workers"] == workers:
        return earlier
    return earlier + (Layout(saved["world_size"], saved["num_workers"], step - sum(x.steps for x in earlier)),)


def schedule_position(position: int, total: int, remaining: int) -> int:
    """Where a schedule ``total`` steps long, at step ``position``, goes on when ``remaining`` steps are left.

    The answer keeps the fraction done: ``p / (p + remaining) == position / total``, and ``p + remaining`` becomes
    the schedule's new length.
    """
    if total <= position or remaining <= 0:
        return position
    return round(position * remaining / (total - position))


def continue_after_resize(checkpoint: Checkpoint, loader: ShardLoader, steps: list[int],
                          world: int) -> tuple[tuple[Layout, ...], int | None, int]:
    """How the run in ``checkpoint`` goes on with ``world`` ranks; ``steps`` (per epoch, for this world) is updated.

    Returns the layouts that ran the resumed epoch's first steps (for ``loader.epoch``), the schedule position to
    continue from (None: the checkpoint's, the world is unchanged) and the schedule's length.
    """
    state = checkpoint.training
    assert state is not None, "a checkpoint without training state (model.pt) cannot be resumed"
    epoch, step = checkpoint.epoch, checkpoint.step
    saved = state.loader[0]
    earlier = layouts_before(saved, step, world, loader.data.loader_workers)
    if earlier and epoch < len(steps):
        steps[epoch] = loader.steps_in_epoch(epoch, earlier)
    if saved["world_size"] == world:
        return earlier, None, sum(steps)
    remaining = sum(steps[epoch:]) - step
    at = schedule_position(state.scheduler["last_epoch"], state.schedule_steps or sum(steps), remaining)
    return earlier, at, at + remaining
