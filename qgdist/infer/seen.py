"""Scoring jets a model trained or validated on: counted, and refused unless the user asks for it.

Metrics on training or validation jets are optimistic, and a test split converted again with other fractions, or
from a renamed copy of a training file, can hold many of them without any name showing it. The checkpoint knows
which jets it saw (``qgdist.data.identity.TrainedOn``); ``evaluate`` and ``predict`` count them in what they score
before scoring anything.
"""

from __future__ import annotations

from qgdist.core.errors import InputError
from qgdist.data.identity import TrainedOn

#: The flag that scores seen jets anyway (EvalConfig.score_seen / PredictConfig.score_seen).
FLAG = "--score-seen-jets"


def check_seen(trained: TrainedOn | None, counts: dict[str, int] | None, what: str, allow: bool) -> int | None:
    """The number of seen jets in ``what`` (``counts``: per file), None when unknown (a checkpoint or dataset from
    before identities); raises ``InputError`` when there are any and ``allow`` is off."""
    if trained is None or counts is None:
        return None
    total = sum(counts.values())
    if total and not allow:
        per_file = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items())[:5])
        raise InputError(
            f"{what} holds {total} jets the model trained or validated on ({per_file}; it trained on "
            f"{trained.describe()}): their scores would make its metrics look better than they are. Score data the "
            f"model never saw, or give {FLAG} to score them anyway (the count goes into the output)",
            field="data", got=total)
    return total
